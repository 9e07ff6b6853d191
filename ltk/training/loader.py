"""TokenLoader: (x, y) batches of next-token prediction from token shards.

Windows. Each shard's stream is cut into windows of block_size + 1 tokens, starting every
block_size tokens (consecutive windows share one token: the last target of one is the first
input of the next, so every token but a shard's first is a target exactly once per epoch):

    stream   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          block_size = 3
    window 0 t0 t1 t2 t3           x = t0 t1 t2   y = t1 t2 t3
    window 1          t3 t4 t5 t6  x = t3 t4 t5   y = t4 t5 t6
    window 2                   t6 t7 t8 t9 ...

Windows never cross a shard boundary, and the tail of a shard too short for a whole window
is not used. Windows are numbered across shards in file order: 0 .. num_windows - 1.

Order. Epoch e visits every window once, in a permutation drawn from a generator seeded
with (seed, e) (numpy's PCG64): the same on every run and every rank, with no communication.

Distributed. One global step takes the next batch_size * world_size windows of the
permutation; rank r takes the r-th run of batch_size of them:

    permutation   p0 p1 p2 p3 | p4 p5 p6 p7 | p8 ...      batch_size 2, world_size 2
    taken by      r0 r0 r1 r1 | r0 r0 r1 r1 | r0 ...      (r0 = rank 0)
                  step 0        step 1

So the ranks of one step together hold exactly the batch of batch_size * world_size that a
single process would draw, in the same order: the fact that lets a test prove data-parallel
training equals single-process training. The windows left at the end of an epoch that
cannot fill a whole global step are skipped (a different few each epoch, as the
permutation changes); the next epoch then starts.

Resuming. state_dict() is the global position (epoch, step within it), identical on every
rank; after load_state_dict() the next batches are the ones the uninterrupted run would have
drawn, bit for bit. Resuming with another split of the same global batch (4 ranks x 2 instead
of 2 ranks x 4) continues the same global batches, so only the global batch size must match.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ltk.training.shards import read_shard

_STATE_VERSION = 1


class TokenLoader:
    """Shuffled training batches and fixed evaluation batches over a list of token shards."""

    def __init__(self, files: Sequence[str | Path], block_size: int, batch_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not files:
            raise ValueError("TokenLoader needs at least one shard file")
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shards = [read_shard(f) for f in files]
        per_shard = [max(len(s) - 1, 0) // block_size for s in self.shards]
        self._first_window = np.concatenate([[0], np.cumsum(per_shard)])  # shard i starts at window [i]
        self.num_windows = int(self._first_window[-1])
        if self.num_windows == 0:
            total = sum(len(s) for s in self.shards)
            raise ValueError(
                f"too few tokens for one window of block_size + 1 = {block_size + 1} tokens: the data has "
                f"{total} tokens (largest shard {max(len(s) for s in self.shards)}); "
                "use a smaller --model.block_size or more data")
        self.epoch = 0
        self.cursor = 0  # global steps already taken in this epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    @property
    def global_batch(self) -> int:
        """Windows per global step, over all ranks."""
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), both int64 of shape (batch_size, block_size)."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data has {self.num_windows} windows of {self.block_size + 1} tokens, fewer "
                             f"than one global batch of batch_size x world_size = {self.global_batch}; "
                             "use a smaller batch or block size, or more data")
        if self.cursor >= self.steps_per_epoch:
            self.epoch += 1
            self.cursor = 0
        start = self.cursor * self.global_batch + self.rank * self.batch_size
        windows = self._permutation()[start:start + self.batch_size]
        self.cursor += 1
        return self._gather(windows)

    def eval_batches(self, n_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the first n_batches global batches of windows, in file order.

        Not shuffled and independent of the training position, so every evaluation scores
        the same windows. Yields min(n_batches, num_windows // global batch) batches (all of
        them when n_batches is None), split across ranks like next_batch.
        """
        available = self.steps_per_epoch
        if available == 0:
            raise ValueError(f"the data has {self.num_windows} windows, fewer than one global batch of "
                             f"{self.global_batch}; use a smaller batch or block size, or more data")
        count = available if n_batches is None else min(n_batches, available)
        return self._eval_iter(count)

    def _eval_iter(self, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(count):
            start = step * self.global_batch + self.rank * self.batch_size
            yield self._gather(np.arange(start, start + self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        """The position in the data stream: small, JSON-serialisable, the same on every rank."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "block_size": self.block_size, "batch_size": self.batch_size, "world_size": self.world_size,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {_STATE_VERSION}")
        if state["block_size"] != self.block_size:
            raise ValueError(f"loader state has block_size {state['block_size']}, this loader {self.block_size}")
        if state["num_windows"] != self.num_windows:
            raise ValueError(f"loader state counts {state['num_windows']} windows, this data {self.num_windows}: "
                             "the data changed since the state was saved")
        saved_global = state["batch_size"] * state["world_size"]
        if saved_global != self.global_batch:
            raise ValueError(
                f"loader state was saved with batch_size {state['batch_size']} x world_size {state['world_size']} "
                f"= {saved_global} windows per step; this loader has {self.batch_size} x {self.world_size} "
                f"= {self.global_batch}: the batches would not continue the same stream")
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self._perm_epoch = -1  # the seed may have changed: draw the permutation again

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the given windows out of the memory-mapped shards into (x, y)."""
        rows = np.empty((len(windows), self.block_size + 1), dtype=np.int64)  # (B, T+1)
        shard_of = np.searchsorted(self._first_window, windows, side="right") - 1
        for row, (window, shard) in enumerate(zip(windows, shard_of)):
            start = (int(window) - int(self._first_window[shard])) * self.block_size
            rows[row] = self.shards[shard][start:start + self.block_size + 1]
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, T), (B, T)
