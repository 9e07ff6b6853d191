"""Ulysses sequence parallelism: attention over a sequence split across the N ranks of a context
parallel (CP) group by trading the sequence split for a head split (Jacobs et al. 2023,
"DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence
Transformer Models", arXiv 2309.14509, §3.1).

Rank r holds q, k, v of its T_local positions and all H heads. One all-to-all per tensor
turns that into all T positions of H/N heads; attention runs locally (heads are independent:
the usual kernel, ltk/kernels/attention.py); one all-to-all turns the output back:

    q, k, v  (B, H, T/N, D)  --all-to-all-->  (B, H/N, T, D)  --attention-->  o (B, H/N, T, D)
    o        (B, H/N, T, D)  --all-to-all-->  (B, H, T/N, D)

An all-to-all cuts each rank's tensor into N equal parts and sends part i to rank i; a rank
keeps 1/N and sends (N−1)/N of every tensor. Its backward is the inverse all-to-all of the
gradient (the same permutation, transposed). Bytes sent per rank and call (CP_STATS under
"ulysses.forward" / "ulysses.backward"), 4 all-to-alls each way:

    (N−1)/N · (|q| + |k| + |v| + |o|)      backward: the same of dq, dk, dv, do

Constraints. H % N == 0 (a rank owns whole heads), checked with an error naming both. GQA:
K/V heads are sharded like the query heads when H_kv % N == 0; otherwise each K/V head is
repeated N / gcd(H_kv, N) times first (to H_kv' = lcm(H_kv, N), which divides H), so that each
rank receives the K/V heads its query heads read — more bytes than sharding, no approximation;
autograd sums the repeated heads' gradients back.

Layouts. The shards may be cut contiguous or zig-zag (ltk/parallel/context_parallel.py): after
the all-to-all the positions arrive in rank order, and are put back into sequence order (one
index_select) before the causal mask is applied, and returned to the shard order after.
Padding (T not divisible by 2N): the padded positions are the last ones; without a causal
mask they are masked as keys; padded rows return 0.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ltk.kernels.attention import attention
from ltk.parallel import timeline
from ltk.parallel.context_parallel import CP_STATS, CPGroup, check_layout, chunk_size, positions, valid


def _all_to_all(x: torch.Tensor, cp: CPGroup, to_heads: bool, key: str) -> torch.Tensor:
    """to_heads: (B, H, T_local, D) -> (B, H/N, N·T_local, D), positions in rank order;
    else the inverse."""
    n = cp.size
    if to_heads:
        B, H, Tl, D = x.shape
        inp = x.reshape(B, n, H // n, Tl, D).transpose(0, 1).contiguous()  # (N, B, H/N, Tl, D): part i -> rank i
    else:
        B, Hn, T, D = x.shape
        inp = x.reshape(B, Hn, n, T // n, D).permute(2, 0, 1, 3, 4).contiguous()  # (N, B, H/N, Tl, D)
    out = torch.empty_like(inp)
    CP_STATS.calls[key] += 1
    CP_STATS.sent[key] += inp.numel() // n * (n - 1) * inp.element_size()  # all but the part kept
    timeline.record("all_to_all", cp.ranks, lambda: dist.all_to_all_single(out, inp, group=cp.group), False)
    if to_heads:  # out[i]: rank i's positions of this rank's heads
        return out.permute(1, 2, 0, 3, 4).reshape(B, H // n, n * Tl, D)
    return out.transpose(0, 1).reshape(B, n * Hn, T // n, D)  # out[i]: rank i's heads of this rank's positions


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp: CPGroup, to_heads: bool):
        ctx.cp, ctx.to_heads = cp, to_heads
        return _all_to_all(x, cp, to_heads, "ulysses.forward")

    @staticmethod
    def backward(ctx, g):  # the inverse permutation
        return _all_to_all(g, ctx.cp, not ctx.to_heads, "ulysses.backward"), None, None


def kv_heads_sent(h_kv: int, n: int) -> int:
    """K/V heads that go through the all-to-all: H_kv, or lcm(H_kv, N) when N does not divide it."""
    return h_kv if h_kv % n == 0 else math.lcm(h_kv, n)


def ulysses_attention(q, k, v, group=None, causal: bool = True, layout: str = "zigzag", softmax_scale=None,
                      seq_len: int | None = None, backend: str = "auto"):
    """Attention of this rank's queries over the whole sequence, sharded over `group`, by
    all-to-all to a head split and back. Same arguments and result as
    ltk.parallel.ring_attention.ring_attention: q (B, H, 2c, D), k, v (B, H_kv, 2c, D), this
    rank's shard in `layout`; seq_len the real length (padded rows return 0); backend the
    local attention's ("auto": triton on CUDA). Needs H % N == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (B, heads, T_local, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    check_layout(layout)
    cp = CPGroup.of(group)
    n = cp.size
    B, H, Tl, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be (B, H_kv, T_local, D) = ({B}, H_kv, {Tl}, {D}) like q; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"q's H={H} heads must be a multiple of k/v's H_kv={k.shape[1]} (GQA)")
    if H % n:
        raise ValueError(f"Ulysses splits the heads over the CP group: H={H} query heads do not divide over "
                         f"N={n} ranks (H % N = {H % n}); use ring attention or a CP degree that divides {H}")
    if Tl % 2:
        raise ValueError(f"a rank's shard holds two chunks, so T_local must be even, got {Tl}: "
                         "cut it with ltk.parallel.context_parallel.shard_sequence")
    t_pad = Tl * n
    T = t_pad if seq_len is None else int(seq_len)
    if not 1 <= T <= t_pad or chunk_size(T, n) != Tl // 2:
        raise ValueError(f"seq_len={T} does not pad to the shards: {n} ranks x T_local={Tl} hold chunks of "
                         f"{Tl // 2}, and T={T} needs chunks of ceil(T / {2 * n})")
    real = valid(T, cp.rank, n, layout, q.device)[:, None]  # (2c, 1)
    if n == 1:
        kpm = None if causal or T == t_pad else (torch.arange(t_pad, device=q.device) < T).expand(B, t_pad)
        o = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, key_padding_mask=kpm, backend=backend)
        return o.where(real, 0.0)
    rep = kv_heads_sent(k.shape[1], n) // k.shape[1]
    if rep > 1:  # (B, H_kv·rep, 2c, D): each rank then gets whole groups of its query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qh, kh, vh = (_AllToAll.apply(t, cp, True) for t in (q, k, v))  # (B, heads/N, T_pad, D), rank order
    order = torch.cat([positions(T, r, n, layout, q.device) for r in range(n)])  # position of each row
    if layout != "contiguous":  # rank order is sequence order only for the contiguous split
        qh, kh, vh = (t.index_select(2, torch.argsort(order)) for t in (qh, kh, vh))  # for the causal mask
    kpm = None if causal or T == t_pad else (torch.arange(t_pad, device=q.device) < T).expand(B, t_pad)
    o = attention(qh, kh, vh, causal=causal, softmax_scale=softmax_scale, key_padding_mask=kpm, backend=backend)
    if layout != "contiguous":
        o = o.index_select(2, order)  # back to rank order
    o = _AllToAll.apply(o, cp, False)  # (B, H, 2c, D)
    return o.where(real, 0.0)
