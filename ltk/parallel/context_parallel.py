"""Context parallelism: one sequence split over the N ranks of a CP group, and what every split
shares — which positions a rank holds, padding, the per-step block plan of causal attention,
and the counters of bytes and work.

The sequence of T tokens is padded to T_pad = 2N·c (c = ceil(T / 2N), the chunk) and cut into
2N chunks of c positions; each rank holds two chunks, T_local = 2c positions:

    contiguous   rank r holds chunks 2r and 2r+1        (one run of T_pad / N positions)
    zigzag       rank r holds chunks r and 2N−1−r        (Brandon et al. 2023, "Striped
                 Attention", arXiv 2311.09431, §3, for the load-balance argument; the zig-zag
                 form is zhuzilin/ring-flash-attention's and torchtitan's context parallel)

    N = 4, 8 chunks:     chunk   0  1  2  3  4  5  6  7
        contiguous       rank    0  0  1  1  2  2  3  3
        zigzag           rank    0  1  2  3  3  2  1  0

Why zig-zag. Under a causal mask query chunk a sees key chunk b fully when b < a, half (the
diagonal) when b = a, not at all when b > a. Contiguous: rank r's queries see the 2r chunks
before them — rank 0 computes 1 chunk-pair (plus two diagonals), rank N−1 computes 4N−3; the
ring waits for the slowest. Zig-zag pairs an early chunk with a late one: every rank sees
exactly 2N−1 full chunk-pairs and 2 diagonals, whichever N.

Padding. The T_pad − T padded positions are the last ones, so under a causal mask no real
query sees a padded key; without one the padded keys are masked. Padded query rows output 0
and pass no gradient (ring_attention, ulysses_attention): nothing leaks into real positions.
`positions` gives each rank its global position ids (for RoPE or learned positions; padded
positions are ≥ T and should be ignored by the loss, `valid`).

Counters. `CP_STATS` counts, per function and direction ("ring.forward", "ulysses.backward"),
the bytes a rank sends and the work it does: `blocks` = c×c score tiles computed (a diagonal
tile counts 1), `pairs` = the (query, key) pairs inside them that the mask keeps.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


@dataclass
class CPStats:
    """Per key (e.g. "ring.forward"): calls, bytes sent by this rank, score tiles and kept
    (query, key) pairs computed by this rank; since the last `reset`."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    blocks: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    pairs: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def reset(self) -> None:
        for d in (self.calls, self.sent, self.blocks, self.pairs):
            d.clear()

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "sent": dict(self.sent), "blocks": dict(self.blocks),
                "pairs": dict(self.pairs)}


CP_STATS = CPStats()


@dataclass(frozen=True)
class CPGroup:
    """The CP group as the attention functions use it: the process group, its size and this
    rank's place, and the global ranks (what P2POp and the timeline want)."""

    group: dist.ProcessGroup | None
    size: int
    rank: int
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, group) -> "CPGroup":
        """group: a ProcessGroup, None (the world, or one process when none is initialised),
        an ltk.parallel.dist.Comm (its group), or a CPGroup."""
        if isinstance(group, CPGroup):
            return group
        if hasattr(group, "group") and hasattr(group, "key"):  # a Comm
            group = group.group
        if not dist.is_initialized():
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            return cls(None, 1, 0, (0,))
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
            range(dist.get_world_size()))
        return cls(group, dist.get_world_size(group), dist.get_rank(group), ranks)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunk_size(T: int, n: int) -> int:
    """c = ceil(T / 2N): the padded sequence is 2N chunks of c positions."""
    if T < 1 or n < 1:
        raise ValueError(f"need a sequence of T >= 1 tokens and N >= 1 ranks, got T={T}, N={n}")
    return math.ceil(T / (2 * n))


def padded_length(T: int, n: int) -> int:
    return 2 * n * chunk_size(T, n)


def chunk_ids(rank: int, n: int, layout: str) -> tuple[int, int]:
    """The two global chunk indices rank `rank` of `n` holds, ascending."""
    check_layout(layout)
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is not in a group of {n}")
    return (rank, 2 * n - 1 - rank) if layout == "zigzag" else (2 * rank, 2 * rank + 1)


def positions(T: int, rank: int, n: int, layout: str, device=None) -> torch.Tensor:
    """Global position ids of the 2c positions rank `rank` holds, in its local order (int64);
    ids >= T are padding."""
    c = chunk_size(T, n)
    return torch.cat([torch.arange(b * c, (b + 1) * c, device=device) for b in chunk_ids(rank, n, layout)])


def valid(T: int, rank: int, n: int, layout: str, device=None) -> torch.Tensor:
    """Bool (2c,): True at this rank's real (not padded) positions."""
    return positions(T, rank, n, layout, device) < T


def shard_sequence(x: torch.Tensor, dim: int, rank: int, n: int, layout: str, pad_value=0) -> torch.Tensor:
    """This rank's shard of a full sequence tensor: pad `dim` to T_pad with pad_value, take the
    rank's two chunks (a copy). Differentiable (index_select)."""
    T = x.shape[dim]
    pad = padded_length(T, n) - T
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, pad_value)], dim=dim)
    return x.index_select(dim, positions(T, rank, n, layout, x.device))


def gather_sequence(x: torch.Tensor, dim: int, group, layout: str, T: int) -> torch.Tensor:
    """The inverse of shard_sequence on every rank: all-gather the shards, put the positions
    back in order, drop the padding. Not differentiable (for checks and evaluation)."""
    cp = CPGroup.of(group)
    parts = [torch.empty_like(x) for _ in range(cp.size)]
    if cp.size > 1:
        dist.all_gather(parts, x.contiguous(), group=cp.group)
    else:
        parts = [x]
    pos = torch.cat([positions(T, r, cp.size, layout, x.device) for r in range(cp.size)])
    full = torch.empty_like(torch.cat(parts, dim=dim))
    full.index_copy_(dim, pos, torch.cat(parts, dim=dim))
    return full.narrow(dim, 0, T)


@dataclass(frozen=True)
class Block:
    """The attention one local query chunk (index `q` of 2 in the rank's shard) does against
    the K/V shard at hand: its first `k_chunks` chunks (0, 1 or 2; a prefix, since a shard's
    chunks ascend), the last of them on the diagonal when `diagonal` (bottom-right causal
    mask), and `pad_keys` of those keys are padding (masked)."""

    q: int
    k_chunks: int
    diagonal: bool
    pad_keys: int

    def pairs(self, c: int) -> int:
        """(query, key) pairs the mask keeps, c queries; padded keys count as dropped."""
        full = (self.k_chunks - self.diagonal) * c * c - self.pad_keys * c
        return full + (c * (c + 1) // 2 if self.diagonal else 0)


def step_blocks(q_chunks, k_chunks, c: int, T: int, causal: bool) -> list[Block]:
    """The blocks of one ring step: local query chunks `q_chunks` against key chunks
    `k_chunks` (global indices, ascending). Causal: key chunk b < a fully visible, b = a the
    diagonal, b > a masked (skipped). Not causal: every chunk that holds a real key; the
    padded keys (positions >= T, at the end) are masked. Blocks with nothing to see are left out."""
    out = []
    for i, a in enumerate(q_chunks):
        if causal:
            vis = [b for b in k_chunks if b <= a]
            pad = 0  # padded keys come after every real query: the causal mask hides them
        else:
            vis = [b for b in k_chunks if b * c < T]
            pad = max(0, (vis[-1] + 1) * c - T) if vis else 0
        if vis:
            out.append(Block(i, len(vis), causal and vis[-1] == a, pad))
    return out


def ring_work(T: int, n: int, layout: str, causal: bool, rank: int) -> tuple[int, int]:
    """(c×c tiles, kept pairs) rank `rank`'s queries compute over a whole ring pass (forward;
    the backward recomputes the same tiles) — the formula the counters are checked against."""
    c = chunk_size(T, n)
    mine = chunk_ids(rank, n, layout)
    blocks = [b for s in range(n) for b in step_blocks(mine, chunk_ids((rank - s) % n, n, layout), c, T, causal)]
    return sum(b.k_chunks for b in blocks), sum(b.pairs(c) for b in blocks)


METHODS = ("ring", "ulysses")


class ContextParallel:
    """The one setting a model needs: its attention calls

        y = cp.attention(q, k, v, causal=True, backend=...)    # instead of kernels.attention.attention

    on this rank's shard q (B, H, 2c, D), k, v (B, H_kv, 2c, D), and the rest of the model is
    unchanged (every other layer acts per position). The trainer cuts each batch with
    `cp.shard(x, dim=1)` (tokens; labels with pad_value=-100, so the loss ignores padding),
    gives RoPE / learned positions `cp.positions(T)`, and sets `cp.seq_len = T` when the
    batch's T does not divide into 2N chunks (padded rows then output 0).

    group: a ProcessGroup, an ltk Comm or None (the world); method "ring" (any head count,
    K/V around the ring) or "ulysses" (all-to-all; H % N == 0); layout "zigzag" (balanced
    causal work) or "contiguous"."""

    def __init__(self, group=None, method: str = "ring", layout: str = "zigzag", seq_len: int | None = None):
        if method not in METHODS:
            raise ValueError(f"context parallel method must be one of {METHODS}, got {method!r}")
        check_layout(layout)
        self.cp, self.method, self.layout, self.seq_len = CPGroup.of(group), method, layout, seq_len

    @property
    def size(self) -> int:
        return self.cp.size

    @property
    def rank(self) -> int:
        return self.cp.rank

    def attention(self, q, k, v, *, causal: bool = True, softmax_scale=None, segment_ids=None,
                  backend: str = "auto"):
        if segment_ids is not None:
            raise ValueError("context parallel attention takes no segment_ids (document masking of packed rows): "
                             "train with cp on unpacked rows, or cp = 1")
        if self.method == "ring":  # imported here: both modules import this one
            from ltk.parallel.ring_attention import ring_attention as fn
        else:
            from ltk.parallel.ulysses import ulysses_attention as fn
        return fn(q, k, v, group=self.cp, causal=causal, layout=self.layout, softmax_scale=softmax_scale,
                  seq_len=self.seq_len, backend=backend)

    def shard(self, x: torch.Tensor, dim: int = 1, pad_value=0) -> torch.Tensor:
        return shard_sequence(x, dim, self.rank, self.size, self.layout, pad_value)

    def positions(self, T: int, device=None) -> torch.Tensor:
        return positions(T, self.rank, self.size, self.layout, device)

    def gather(self, x: torch.Tensor, dim: int, T: int) -> torch.Tensor:
        return gather_sequence(x, dim, self.cp, self.layout, T)
