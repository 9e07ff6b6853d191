"""Evaluation on the sharded model itself: no rank ever builds a second, whole copy.

A validation pass is a forward pass, so it can run on whatever each rank holds, the way a
training forward does:

    ZeRO-3      the engine's forward hooks gather one unit at a time and free it after (the
                root unit stays gathered through the forward), exactly as in training, under
                no_grad. The all-gathers are collectives over the dp ranks, so every rank must
                make the same number of forward calls: ranks that run out of batches repeat
                their first one and discard it (`EvalShare.calls`).
    tensor      the tp ranks of one replica score the same batch together: the head's logits stay
    parallel    split by vocabulary and the per-token loss is the vocab-parallel cross-entropy
                (ltk/parallel/tensor.py), never a gathered (B, T, V) tensor.
    pipeline    a forward-only pass through the stages in order: the rank holding stage s sends
                its activations to the holder of s + 1 (no schedule: nothing to overlap without a
                backward); the last stage scores the batch.

Each data-parallel replica scores batches i ≡ dp_rank (mod dp); partial sums are added over the
ranks that scored different batches (`EvalShare.all_reduce`), so every rank ends with the global
figure. The collectives of evaluation are counted apart (not in parallel.dist.STATS): a step's
bytes stay the step's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.parallel.dist import Comm, CommStats


@dataclass
class EvalShare:
    """How one rank takes part in an evaluation over `n` batches.

    model       what to call: the whole model, or the sharded one (its hooks gather)
    rank, size  this rank scores batches rank, rank + size, ... (size: data-parallel replicas)
    lockstep    collectives run inside forward: every rank must make `calls(n)` forward calls
    all_reduce  sums partial results over the ranks that scored different batches
    eval_sums   replaces objective.eval_sums (tensor parallelism: vocab-parallel scoring), or None
    """

    model: nn.Module
    rank: int
    size: int
    lockstep: bool
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
    eval_sums: Callable | None = None

    def mine(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.size))

    def calls(self, n: int) -> int:
        """Forward calls this rank makes: its batches, or ceil(n / size) when in lockstep."""
        return math.ceil(n / self.size) if self.lockstep else len(self.mine(n))


def quiet(comm: Comm) -> Comm:
    """The same group, counted apart: evaluation's collectives are not a training step's."""
    return Comm(comm.group, stats=CommStats())


def sum_over(*comms: Comm) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum a tensor over each of the groups in turn (a sum over their product)."""
    groups = [quiet(c) for c in comms if c.size > 1]

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        for c in groups:
            c.all_reduce(t)
        return t

    return reduce


def tp_eval_sums(objective) -> Callable:
    """objective.eval_sums for a tensor-parallel causal LM: nats per token from this rank's
    vocabulary slice of the logits (ltk/parallel/tp_plan.py `tp_loss` without the mean)."""
    from ltk.parallel.tensor import vocab_parallel_cross_entropy
    from ltk.parallel.tp_plan import _head

    if objective.name != "causal-lm":
        raise ValueError(f"tensor parallelism evaluates the causal LM objective, not {objective.name}")

    def eval_sums(model, x, y, gen, token_bytes) -> torch.Tensor:
        head = _head(model)
        logits = model(x)[..., :head.n_valid]  # (B, T, V_r): padded columns sliced off
        nats = vocab_parallel_cross_entropy(logits.flatten(0, 1), y.flatten(), head.vocab_start,
                                            quiet(model.tp_comm)).float()  # (B·T,)
        nbytes = token_bytes[y.view(-1)]
        return torch.stack([nats.sum().double(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                              device=x.device),
                            nats[nbytes > 0].sum().double(), nbytes.sum().double()])

    return eval_sums


@torch.no_grad()
def pipeline_eval_sums(run, x: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """[Σ nats, #targets, Σ nats over byte tokens, Σ bytes] of (x, y) through the pipeline of
    `run` (a PipelineRun): stage s = c·p + r lives on pp rank r as chunk c; activations
    (B, T, d) go to the holder of the next stage. Only the last stage's rank returns non-zero
    sums (add them over the pp group)."""
    trainer = run.trainer
    p, v, me = run.pp_comm.size, len(run.chunks), run.pp_rank
    act_comm = quiet(trainer.comms.act)
    sums = torch.zeros(4, dtype=torch.float64, device=trainer.device)
    B, T = x.shape
    h = None
    for s in range(p * v):
        owner, nxt = s % p, (s + 1) % p
        if owner == me:
            chunk = run.chunks[s // p]
            out = chunk(x if s == 0 else h)
            if s == p * v - 1:  # the head's logits (B, T, V)
                nats = F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="none")
                nbytes = token_bytes[y.view(-1)]
                sums += torch.stack([nats.sum().double(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                       device=sums.device),
                                     nats[nbytes > 0].sum().double(), nbytes.sum().double()])
            elif nxt != me:
                act_comm.send(out, nxt).wait()
            else:
                h = out
        elif nxt == me and s < p * v - 1:
            h = torch.empty(B, T, trainer.hidden, dtype=trainer.dtype, device=trainer.device)  # (B, T, d)
            act_comm.recv(h, owner).wait()
    return sums
