"""Ring attention: exact attention over a sequence split across the N ranks of a context
parallel (CP) group, K/V travelling around the ring (Liu, Zaharia & Abbeel 2023, "Ring
Attention with Blockwise Transformers for Near-Infinite Context", arXiv 2310.01889, §3; the
causal load balance of Brandon et al. 2023, "Striped Attention", arXiv 2311.09431, in the
zig-zag form of zhuzilin/ring-flash-attention and torchtitan's context parallel).

Rank r holds Q_r, K_r, V_r: its 2c positions (ltk/parallel/context_parallel.py, layouts).
Forward, steps s = 0 .. N−1: rank r holds the K/V shard of rank j = r − s (mod N); it
*posts* the exchange (send that shard to r+1, receive the next from r−1, one batched
isend/irecv) and computes the attention of Q_r against the shard at hand while the bytes
move; then the partial results are merged exactly with their log-sum-exps (fp32):

    lse = log Σ_s exp(lse_s)          O = Σ_s exp(lse_s − lse) · O_s

Causal, per chunk (context_parallel.step_blocks): key chunk b is fully visible to query
chunk a when b < a, on the diagonal when b = a (bottom-right causal mask), masked when b > a
and then skipped. With the zig-zag layout every rank computes the same 2N+1 c×c tiles.

Backward (FlashAttention-2's, block by block: ltk/parallel/block_attention.py): the ring runs
again; each step recomputes P = exp(S − lse) of its blocks from the saved final lse and O.
dQ accumulates locally. dK, dV of the shard at hand are added into an fp32 buffer that travels
with it: at step s a rank receives the buffer of the shard it now holds (filled by the ranks
before it), adds its share and passes it on; after the last step one more hop brings each
buffer home, holding the sum over all N ranks.

Bytes sent per rank and call (counted in CP_STATS under "ring.forward" / "ring.backward"):

    forward     (N−1) · |K_r + V_r|
    backward    (N−1) · |K_r + V_r|  +  N · |dK_r + dV_r| (fp32; fp64 for fp64 inputs)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ltk.parallel import timeline
from ltk.parallel.block_attention import acc_dtype, block_backward, block_forward, merge
from ltk.parallel.context_parallel import CP_STATS, CPGroup, check_layout, chunk_ids, chunk_size, step_blocks, valid

_KV_TAG, _DKV_TAG = 0, 1  # two messages may travel between a pair at once in the backward


def _exchange(cp: CPGroup, pairs: list[tuple[torch.Tensor, torch.Tensor, int]], key: str) -> list:
    """Post, as one batch, for each (send, recv, tag): send to the next rank, receive from the
    previous one. Returns the handles (wait before reading the received tensors)."""
    me = cp.ranks[cp.rank]
    nxt, prv = cp.ranks[(cp.rank + 1) % cp.size], cp.ranks[(cp.rank - 1) % cp.size]
    CP_STATS.calls[key] += 1
    ops, marks = [], []  # marks: (op, src, dst) of each P2POp, for the timeline
    for send, recv, tag in pairs:
        CP_STATS.sent[key] += send.numel() * send.element_size()
        ops += [dist.P2POp(dist.isend, send, nxt, cp.group, tag), dist.P2POp(dist.irecv, recv, prv, cp.group, tag)]
        marks += [("send", me, nxt), ("recv", prv, me)]
    works: list = []

    def post():  # batched: NCCL would deadlock on a ring of separate blocking sends
        works.extend(dist.batch_isend_irecv(ops))
        return works[0]

    op, src, dst = marks[0]
    handles = [timeline.record(op, cp.ranks, post, True, src=src, dst=dst)]
    handles += [timeline.record(op, cp.ranks, lambda w=w: w, True, src=a, dst=b)
                for (op, a, b), w in zip(marks[1:], works[1:])]
    return handles


def _blocks(ctx, s: int):
    """The blocks of step s: this rank's query chunks against rank (r − s)'s key chunks."""
    n, r = ctx.cp.size, ctx.cp.rank
    return step_blocks(chunk_ids(r, n, ctx.layout), chunk_ids((r - s) % n, n, ctx.layout), ctx.c, ctx.T, ctx.causal)


def _kpm(b, c: int, batch: int, device) -> torch.Tensor | None:
    """(B, S) True at the real keys of the block's prefix; None when none is padding."""
    if not b.pad_keys:
        return None
    S = b.k_chunks * c
    return (torch.arange(S, device=device) < S - b.pad_keys).expand(batch, S)


def _count(key: str, blocks, c: int) -> None:
    CP_STATS.blocks[key] += sum(b.k_chunks for b in blocks)
    CP_STATS.pairs[key] += sum(b.pairs(c) for b in blocks)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup, causal: bool, layout: str, scale: float, T: int, backend: str):
        ctx.cp, ctx.causal, ctx.layout, ctx.scale, ctx.T, ctx.backend = cp, causal, layout, scale, T, backend
        ctx.c = c = q.shape[2] // 2
        B, H, _, D = q.shape
        out = torch.zeros(q.shape, dtype=acc_dtype(q), device=q.device)  # (B, H, 2c, D)
        lse = torch.full((B, H, 2 * c), float("-inf"), dtype=acc_dtype(q), device=q.device)
        kv = torch.stack([k, v])  # (2, B, H_kv, 2c, D): one message a step
        for s in range(cp.size):
            if s < cp.size - 1:  # the next shard moves while this one is computed
                nxt = torch.empty_like(kv)
                handles = _exchange(cp, [(kv, nxt, _KV_TAG)], "ring.forward")
            blocks = _blocks(ctx, s)
            for b in blocks:
                rows = slice(b.q * c, (b.q + 1) * c)
                S = b.k_chunks * c
                o_b, lse_b = block_forward(q[:, :, rows], kv[0, :, :, :S], kv[1, :, :, :S], causal=b.diagonal,
                                           scale=scale, kpm=_kpm(b, c, B, q.device), backend=backend)
                merge(out[:, :, rows], lse[:, :, rows], o_b, lse_b)
            _count("ring.forward", blocks, c)
            if s < cp.size - 1:
                for h in handles:
                    h.wait()
                kv = nxt
        real = valid(T, cp.rank, cp.size, layout, q.device)[:, None]  # (2c, 1): padded rows output 0
        out = out.where(real, 0.0).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, real)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, real = ctx.saved_tensors
        cp, c, B = ctx.cp, ctx.c, q.shape[0]
        do = do.where(real, 0.0)  # padded rows pass nothing back
        dq = torch.zeros(q.shape, dtype=acc_dtype(q), device=q.device)
        kv = torch.stack([k, v])
        dkv_in = None  # the travelling dK/dV buffer of the shard at hand, as received
        dkv_out = None  # the one this rank filled last step, to pass on
        for s in range(cp.size + 1 if cp.size > 1 else 1):  # N steps, then the last hop home
            pairs = []
            if s < cp.size - 1:
                nxt = torch.empty_like(kv)
                pairs.append((kv, nxt, _KV_TAG))
            if s >= 1:  # pass last step's buffer on; the last hop (s = N) brings each home
                recv = torch.empty_like(dkv_out)
                pairs.append((dkv_out, recv, _DKV_TAG))
            handles = _exchange(cp, pairs, "ring.backward") if pairs else []
            if s < cp.size:
                dkv = torch.zeros(kv.shape, dtype=acc_dtype(q), device=q.device)  # (2, B, H_kv, 2c, D)
                blocks = _blocks(ctx, s)
                for b in blocks:
                    rows = slice(b.q * c, (b.q + 1) * c)
                    S = b.k_chunks * c
                    g_q, g_k, g_v = block_backward(q[:, :, rows], kv[0, :, :, :S], kv[1, :, :, :S], out[:, :, rows],
                                                   lse[:, :, rows], do[:, :, rows], causal=b.diagonal,
                                                   scale=ctx.scale, kpm=_kpm(b, c, B, q.device), backend=ctx.backend)
                    dq[:, :, rows] += g_q
                    dkv[0, :, :, :S] += g_k
                    dkv[1, :, :, :S] += g_v
                _count("ring.backward", blocks, c)
            for h in handles:
                h.wait()
            if s >= 1:
                dkv_in = recv
            if s < cp.size:
                dkv_out = dkv if s == 0 else dkv + dkv_in
            if s < cp.size - 1:
                kv = nxt
        home = dkv_out if cp.size == 1 else dkv_in  # N hops: the buffer of this rank's own shard
        return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, group=None, causal: bool = True, layout: str = "zigzag", softmax_scale=None,
                   seq_len: int | None = None, backend: str = "auto"):
    """Attention of this rank's queries over the whole sequence, sharded over `group`.

    q (B, H, 2c, D), k, v (B, H_kv, 2c, D): this rank's shard (its two chunks, as
    context_parallel.shard_sequence cuts them with `layout`), H % H_kv == 0 (GQA).
    group: a ProcessGroup, an ltk Comm, or None (the world). causal: the usual lower triangle
    over global positions. seq_len: the real length T before padding (default N·2c: none);
    padded rows return 0. backend: the local block kernels, "auto" (triton on CUDA), "torch",
    "triton". Returns (B, H, 2c, D) in q's dtype; differentiable in q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (B, heads, T_local, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    check_layout(layout)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be (B, H_kv, T_local, D) = ({q.shape[0]}, H_kv, {q.shape[2]}, {q.shape[3]}) "
                         f"like q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's H={q.shape[1]} heads must be a multiple of k/v's H_kv={k.shape[1]} (GQA)")
    if q.shape[2] % 2:
        raise ValueError(f"a rank's shard holds two chunks, so T_local must be even, got {q.shape[2]}: "
                         "cut it with ltk.parallel.context_parallel.shard_sequence")
    cp = CPGroup.of(group)
    t_pad = q.shape[2] * cp.size
    T = t_pad if seq_len is None else int(seq_len)
    if not 1 <= T <= t_pad or chunk_size(T, cp.size) != q.shape[2] // 2:
        raise ValueError(f"seq_len={T} does not pad to the shards: {cp.size} ranks x T_local={q.shape[2]} hold "
                         f"chunks of {q.shape[2] // 2}, and T={T} needs chunks of ceil(T / {2 * cp.size})")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, cp, bool(causal), layout, scale, T, backend)
