"""Packed instruction batches: several examples in one row, kept exactly apart.

Why pack. A padded batch (ltk/training/instruct.py) gives each example a row as long as the
longest example of its batch; every slot past an example's end is computed and thrown away.
The waste, 1 − mean(ℓ) / max(ℓ) of a batch of lengths ℓ, grows with the spread of the
lengths: the built-in task's examples run from 54 to 104 tokens (with a BPE trained on its
text), and at batch 16 a quarter of the padded slots hold nothing. Packing concatenates
examples into rows of at most max_len tokens so that the slots hold tokens:

    x    = ids_1 ‖ ids_2 ‖ … ‖ ids_k ‖ eot … eot          (B, T)
    y    = lab_1 ‖ lab_2 ‖ … ‖ lab_k ‖ −100 … −100         (B, T)
    seg  = 0 … 0 ‖ 1 … 1 ‖ … ‖ k−1 … ‖ −1 … −1             (B, T), PAD_SEGMENT = −1

Why the mask and the position restart. Concatenation alone would let each example attend to
the unrelated examples before it and see positions it never has alone ("cross-
contamination", Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination",
arXiv 2107.02027). Three things keep the examples exactly apart:

    (a) attention is causal and within one segment: allowed(i, j) = j ≤ i and seg_i = seg_j,
        a block-diagonal of lower triangles (ltk/kernels/attention.py `segment_ids`);
    (b) positions restart at 0 at each example's first token (ltk/models/gpt.py
        `segment_positions`: GPT's learned table, Llama's RoPE angles);
    (c) the labels are each example's own (`encode_example`): the last position of an
        example predicts its end-of-text token, never the next example's first token.

With (a) and (b) every example's logits in a packed row equal its logits alone (up to the
rounding of another summation order); with (c) the loss, the mean cross-entropy over the
same response tokens, and its gradient equal those of the padded batch of the same
examples. Padding slots (segment −1) attend only to each other, nothing real attends them,
and their targets are ignored.

Which packing. Each batch is one run of batch_size examples, the same runs as the padded
stream (so packing changes what a step costs, not what it learns); the run is packed into R
rows of width W, the batch tensor (R, W), choosing the R and the assignment that make the
area R·W smallest. For each R from ⌈Σℓ / max_len⌉ to n: LPT (Graham 1969, "Bounds on
multiprocessing timing anomalies": examples longest first, each into the shortest row so
far) gives W_R, the longest row, within 4/3 of the best possible for R rows; R is allowed if
W_R ≤ max_len. R = n puts one example in a row, W = max ℓ: the padded batch itself, so
packing never uses more slots than padding. The scan stops once R · max ℓ reaches the best
area found (no larger R can beat it).

What it leaves and costs. packing_efficiency = real tokens / row slots = Σℓ / (R·W). On the
built-in task (3000 examples, a 400-token BPE trained on its text, max_len 128) the padded
batches of 16 fill 73.7% of their slots, packed runs of 16 81.1%, and the whole data set
packed at once 82.8%: at max_len 128 at most two examples share a row (54 + 54 ≤ 128 <
2·70). Longer rows leave less: runs of 16 fill 93.3% at max_len 256, 98.8% at 512. The
price: a (B, T) tensor of segment ids; a row count that varies from batch to batch; and
attention over longer rows. The torch path builds a (B, 1, T, T) boolean mask and computes all
T² scores of a row, most of them masked; the triton kernels compare ids tile by tile and skip
the tiles between examples, so their work follows Σℓ²/2 of the examples, not T²/2 of the row.
On the torch path (a CPU) the slots saved in the matmuls are partly spent on those longer
attention rows and on the fixed costs of a step, so a step gains less than the slots it saves.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ltk.training.instruct import IGNORE_INDEX, batches

PAD_SEGMENT = -1  # the segment id of padding slots


@dataclass
class Packing:
    rows: list[list[int]]  # the example indices of each row, in the order they sit in it
    lengths: list[int]  # tokens of each example

    @property
    def width(self) -> int:
        """The longest row: the T of the batch tensor."""
        return max(sum(self.lengths[i] for i in row) for row in self.rows)

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots = Σℓ / (rows · width)."""
        return sum(self.lengths) / (len(self.rows) * self.width)


def _lpt(order: list[int], lengths: list[int], n_rows: int) -> tuple[int, list[list[int]]]:
    """Longest first, each into the shortest row (ties: the lowest row index): (width, rows).
    `order` lists the examples longest first."""
    heap = [(0, r) for r in range(n_rows)]  # (tokens so far, row)
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for i in order:
        load, r = heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return max(load for load, _ in heap), rows


def pack_examples(encoded, max_len: int) -> Packing:
    """Pack encoded (ids, labels) pairs into rows of at most max_len tokens, choosing the
    number of rows that makes rows · width smallest (LPT for each; see the module docstring)."""
    if not encoded:
        raise ValueError("pack_examples needs at least one example")
    lengths = [len(ids) for ids, _ in encoded]
    for i, ((ids, labels), n) in enumerate(zip(encoded, lengths)):
        if len(labels) != n or n == 0:
            raise ValueError(f"example {i}: ids and labels must be non-empty and of one length, "
                             f"got {n} and {len(labels)}")
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}: it fits no row")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    best: tuple[int, list[list[int]]] | None = None  # (area, rows)
    for n_rows in range(math.ceil(sum(lengths) / max_len), len(lengths) + 1):
        if best is not None and n_rows * longest >= best[0]:
            break  # every row count from here on needs at least this many slots
        width, rows = _lpt(order, lengths, n_rows)
        if width <= max_len and (best is None or n_rows * width < best[0]):
            best = (n_rows * width, rows)
    assert best is not None  # n rows of one example each always fit
    return Packing(rows=best[1], lengths=lengths)


def pack_batch(encoded, max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, segments) int64 (R, W) for one run of encoded examples (`pack_examples`):
    examples side by side with segment ids 0, 1, ... in each row; padding at the row ends
    with x = pad_id, y = -100, segment PAD_SEGMENT."""
    packing = pack_examples(encoded, max_len)
    shape = (len(packing.rows), packing.width)
    x = torch.full(shape, pad_id, dtype=torch.long)  # (R, W)
    y = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (R, W)
    segments = torch.full(shape, PAD_SEGMENT, dtype=torch.long)  # (R, W)
    for r, row in enumerate(packing.rows):
        t = 0
        for s, i in enumerate(row):
            ids, labels = encoded[i]
            x[r, t:t + len(ids)] = torch.tensor(ids, dtype=torch.long)
            y[r, t:t + len(ids)] = torch.tensor(labels, dtype=torch.long)
            segments[r, t:t + len(ids)] = s
            t += len(ids)
    return x, y, segments


def packed_batches(examples, tok, batch_size: int, max_len: int, *, shuffle: bool = True, seed: int = 0,
                   epochs: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, segments) int64 (B, T): the runs of batch_size examples that
    `training.instruct.batches` yields with the same arguments (the same epochs and seeded
    permutations), each packed into B <= batch_size rows of T <= max_len tokens."""
    return batches(examples, tok, batch_size, max_len, shuffle=shuffle, seed=seed, epochs=epochs, packing=True)


def real_tokens(y: torch.Tensor, segments: torch.Tensor | None = None) -> int:
    """Slots of a batch that hold an example's token. Packed: those not of PAD_SEGMENT.
    Padded (no segments): each row up to its last scored target — an example ends with its
    end-of-text target, never −100, so that is exactly the example's length."""
    if segments is not None:
        return int((segments != PAD_SEGMENT).sum())
    scored = (y != IGNORE_INDEX).flip(1)  # (B, T), last column first
    return int((y.shape[1] - scored.int().argmax(dim=1)).sum())


def pad_rows(x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor, multiple: int):
    """A packed batch with rows of padding appended (x = 0, y = -100, segment PAD_SEGMENT) up to
    a multiple of `multiple` rows: data parallelism gives each of dp ranks a block of B/dp rows,
    and a packed batch has as many rows as its examples needed. A padding row holds no target:
    it adds nothing to the loss or the gradient (the Trainer weights each rank's loss by its
    response tokens)."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x, y, segments
    pad = lambda t, v: torch.cat([t, t.new_full((extra, t.shape[1]), v)])  # noqa: E731 - (B + extra, T)
    return pad(x, 0), pad(y, IGNORE_INDEX), pad(segments, PAD_SEGMENT)
