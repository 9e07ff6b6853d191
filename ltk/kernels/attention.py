"""Fused scaled-dot-product attention (FlashAttention-2 style), forward and backward, in Triton.

Shapes (one naming across the project): B batch, H query heads, H_kv key/value heads
(H_kv divides H; H_kv < H is grouped-query attention, GQA), T queries, S keys, D head dim.

    q (B, H, T, D)    k, v (B, H_kv, S, D)    o (B, H, T, D)

Query head h reads key/value head h // (H / H_kv).

Forward, for one (batch, head), with the additive bias b and the mask M (0 where key j may be
attended by query i, −inf where not):

    S   = scale · Q Kᵀ + b + M                  (T, S)   scale = 1/sqrt(D) by default
    P   = softmax(S)        row-wise             (T, S)
    O   = P V                                    (T, D)
    LSE_i = log Σ_j exp(S_ij)                    (T,)     saved for the backward

The mask combines a key padding mask (key j of sequence b absent), causality and document
masking. CAUSAL CONVENTION: bottom-right aligned, as FlashAttention ≥ 2.1 — query i attends
key j iff j ≤ i + (S − T). When T == S this is the usual lower triangle (SDPA's `is_causal`);
when T < S (decoding with a KV cache) the last query sees every key; when T > S the first
T − S queries see no key at all. A query row with no key to attend (all masked by padding, by
causality, or by a bias of −inf) returns O_i = 0 and passes zero gradients, never NaN.

Document masking (packed sequences): with segment ids seg_q (B, T) and seg_k (B, S),

    allowed(i, j) = causal(i, j)  and  seg_q[i] == seg_k[j]

so several examples concatenated in one row attend only within themselves: with causality,
a block-diagonal of lower triangles (Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination", arXiv 2107.02027; flash-attn's varlen kernels get the same from
cumulative sequence lengths). The launcher computes for each query the range of keys that
share its segment (`_segment_ranges`); each block of the kernels loops only over the union of
its rows' ranges, and masks id by id inside it.

Backward, given dO (Dao 2023, section 2.2 / Algorithm 2):

    dV  = Pᵀ dO                                  (S, D)
    dP  = dO Vᵀ                                  (T, S)
    D_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O)_i      (T,)     (since O = P V)
    dS  = P ∘ (dP − D)                           (T, S)   the softmax Jacobian, row by row
    dQ  = scale · dS K                           (T, D)
    dK  = scale · dSᵀ Q                          (S, D)
    db  = dS, summed over the dimensions the bias was broadcast along

and for GQA dK, dV of a shared key/value head are the sums over the query heads that read it.

Algorithm. Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax", arXiv 1805.02867, Algorithm 3): the softmax of a row can be built one block of
keys at a time, keeping the running maximum m and the running sum l, and rescaling what
was accumulated when the maximum grows:

    m' = max(m, max_j S_ij)      l' = e^(m − m') l + Σ_j e^(S_ij − m')
    acc' = e^(m − m') acc + Σ_j e^(S_ij − m') V_j            O = acc / l,  LSE = m + log l

FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", arXiv 2307.08691): Algorithm 1 (forward: one program per block of
queries, loop over key blocks, divide by l once at the end, save only O and LSE) and
Algorithm 2 (backward: recompute P = exp(S − LSE) block by block instead of storing it;
here split into a dK/dV kernel, one program per key block looping over query blocks, and a
dQ kernel, one program per query block looping over key blocks, so that no two programs
write the same output: no atomics, deterministic results).

Exponentials use exp2 with log2(e) folded into the scale: S·log2(e) is what is computed,
and e^x = 2^(x·log2 e), so the LSE saved by the kernels is in base 2 (an internal detail).

The I/O argument. Naive attention (`attention_reference` below) writes the T×S scores S to
HBM, reads them for the softmax, writes P and reads P again for PV: at least 4 passes over a
T×S matrix (8 bytes per score in bf16), and the backward as many again. For T = S = 8k and
H = 32 that is 4 GiB per pass, per layer and sequence — 16× the bytes of Q, K, V and O
together (the ratio is S / 4D at D = 128). Against 4·D FLOPs per score (QKᵀ and PV) that is
D/2 FLOP/byte, 64 at D = 128, while an H100 needs ~300 FLOP/byte (989 TFLOP/s of bf16
matmul over 3.35 TB/s of HBM) to keep its tensor cores busy: naive attention runs at the
speed of the memory. The fused kernel keeps the tiles of S and P in registers and shared
memory (SRAM) and touches HBM only to read Q, K, V and write O and the LSE:
O((T + S)·D) bytes per head (`bytes_moved` below) for the same 4·T·S·D FLOPs (`flops`
below). Its intensity, ~T·S·D / ((T + S)·D), grows with the sequence length (~T/2
FLOP/byte for T = S in bf16, 2048 at 4k): the kernel is bound by the tensor cores, and its
speed is measured as a fraction of their peak. The price is recomputing S and P in the
backward (5 matmuls instead of 4 there), cheap next to the memory it saves.

The kernels themselves, their grid order, address arithmetic and launch configs are in
ltk/kernels/attention_triton.py; this file holds the API, the references, the argument
checks, the autograd function and the launch code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltk.kernels.backend import (
    HAS_TRITON,
    check_float,
    check_same_device,
    interpreter_on,
    resolve_backend,
)
from ltk.kernels.poison import output_allocator, poisoning

__all__ = ["attention", "attention_reference", "flops", "bytes_moved"]

MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)  # the torch backend also runs in float64
LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x · log2 e)
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=

# Block sizes when the interpreter runs the kernels (programs run one after another on the
# CPU; a fixed config, no autotuning). BLOCK_M != BLOCK_N on purpose: the GPU configs are
# unequal too, and the causal loop bounds must be right for both orders.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}  # (BLOCK_M, BLOCK_N)
# Fill outputs with NaN before the kernels run, so that an element a kernel forgot to write
# cannot pass a test. None: on when the interpreter runs (tests), off on a GPU (speed).
POISON_OUTPUTS: bool | None = None
_empty = output_allocator(__name__)


if HAS_TRITON:
    import triton

    # the kernels and their GPU launch configs (ltk/kernels/attention_triton.py), importable from here
    from ltk.kernels.attention_triton import (  # noqa: F401
        _FP32_BLOCKS,
        _GPU_BLOCKS,
        _attn_bwd_dkdv,
        _attn_bwd_dkdv_h,
        _attn_bwd_dkdv_tuned,
        _attn_bwd_dq,
        _attn_bwd_dq_h,
        _attn_bwd_dq_tuned,
        _attn_bwd_preprocess,
        _attn_fwd,
        _attn_fwd_h,
        _attn_fwd_tuned,
        _gpu_configs,
    )


def _segment_pair(segment_ids, segment_ids_k):
    """(seg_q (B, T), seg_k (B, S)), or None without segments: the keys share the queries'
    ids unless segment_ids_k says otherwise."""
    if segment_ids is None:
        return None
    return segment_ids, segment_ids if segment_ids_k is None else segment_ids_k


def _allowed_keys(T: int, S: int, causal: bool, key_padding_mask: torch.Tensor | None,
                  device: torch.device, segments=None) -> torch.Tensor | None:
    """Boolean mask, True where query i may attend key j, broadcastable to (B, 1, T, S);
    None when everything is allowed. Causal is bottom-right aligned: j <= i + (S - T).
    segments: (seg_q, seg_k) or None; keys of another segment are masked."""
    allowed = None
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allowed = j <= i + (S - T)  # (T, S)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        allowed = pad if allowed is None else allowed & pad
    if segments is not None:
        seg_q, seg_k = segments
        same = seg_q[:, None, :, None] == seg_k[:, None, None, :]  # (B, 1, T, S)
        allowed = same if allowed is None else allowed & same
    return allowed


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, bias=None,
                        segment_ids=None, segment_ids_k=None):
    """Plain PyTorch attention, matmul → softmax → matmul, in the inputs' dtype (the tests
    run it in float64 as the ground truth). Same conventions as `attention`: bottom-right
    causal mask, document mask from segment ids, GQA by repeating each key/value head, rows
    with no key to attend → 0."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if H != H_kv:
        k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(H // H_kv, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if bias is not None:
        s = s + bias
    allowed = _allowed_keys(T, S, causal, key_padding_mask, q.device, _segment_pair(segment_ids, segment_ids_k))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)  # (B, H, T, 1): no key to attend
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v  # (B, H, T, D)


def _validate(q, k, v, key_padding_mask, bias, softmax_scale, dtypes, segment_ids=None, segment_ids_k=None) -> float:
    """Check the arguments; return the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, dtypes)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims ({'B, H, T, D' if name == 'q' else 'B, H_kv, S, D'}), "
                             f"got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} has a zero-size dimension: shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask, bias=bias, segment_ids=segment_ids,
                      segment_ids_k=segment_ids_k)
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size {k.shape[0]} differs from q's {B}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim {k.shape[3]} differs from q's {D}")
    H_kv, S = k.shape[1], k.shape[2]
    if H % H_kv != 0:
        raise ValueError(f"q's head count H={H} must be a multiple of k/v's H_kv={H_kv} (grouped-query attention)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is not supported: at most {MAX_HEAD_DIM}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True where a key may be attended), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got {tuple(key_padding_mask.shape)}")
    if bias is not None:
        check_float("bias", bias, dtypes)
        try:
            ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, (B, H, T, S)) == (B, H, T, S)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (B, H, T, S) = {(B, H, T, S)}")
    _validate_segments(segment_ids, segment_ids_k, B, T, S)
    if softmax_scale is None:
        return D ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def _validate_segments(segment_ids, segment_ids_k, B: int, T: int, S: int) -> None:
    if segment_ids is None:
        if segment_ids_k is not None:
            raise ValueError("segment_ids_k was given without segment_ids: pass the queries' ids as well")
        return
    for name, t, dims, n in (("segment_ids", segment_ids, "B, T", T), ("segment_ids_k", segment_ids_k, "B, S", S)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor (equal ids = one segment), got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (B, n):
            raise ValueError(f"{name} must have shape ({dims}) = {(B, n)}, got {tuple(t.shape)}")
    if segment_ids_k is None and T != S:
        raise ValueError(f"segment_ids holds the ids of the T={T} queries; with S={S} keys pass segment_ids_k "
                         f"of shape {(B, S)} too")


def _attention_torch(q, k, v, causal, scale, key_padding_mask, bias, segments=None):
    """The `torch` backend: PyTorch's fused scaled_dot_product_attention, with the masks
    folded into one attn_mask and rows with no key to attend set to exactly 0 (SDPA alone
    returns NaN or a uniform average there)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    gqa = {}
    if H != H_kv:
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}  # SDPA reads head h // (H / H_kv) itself
        else:
            k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // H_kv, dim=1)
    if bias is None and key_padding_mask is None and segments is None and (not causal or T == S):  # no empty row
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    allowed = _allowed_keys(T, S, causal, key_padding_mask, q.device, segments)
    if bias is None:
        mask = allowed
        dead = ~allowed.any(dim=-1, keepdim=True)
        live_mask = mask | dead  # a dead row attends everything (finite), then is zeroed below
    else:
        mask = bias.to(q.dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
        if bool(torch.isneginf(bias).any()):  # the bias itself may empty a row: scan the full mask
            dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
        else:  # a finite bias (T5's relative positions) empties no row: only the masks can
            dead = None if allowed is None else ~allowed.any(dim=-1, keepdim=True)
        live_mask = mask if dead is None else mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=live_mask, scale=scale, **gqa)
    # zero, not multiply: the gradient reaching the dead rows is then exactly 0, so are their dS
    return out.masked_fill(dead, 0.0) if dead is not None and bool(dead.any()) else out


def _poison() -> bool:
    return poisoning(__name__)


def _new(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return _empty(shape, like.dtype if dtype is None else dtype, like.device)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except along the head dim, which must be 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _segment_ranges(seg_q: torch.Tensor, seg_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop bounds segment ids allow: for each query i, [lo, hi) holding every key j with
    seg_k[j] == seg_q[i], as a contiguous int32 (B, 2, T) (lo then hi); for each key, the
    same over the queries, (B, 2, S). No partner: [n, 0), an empty range. The kernels reduce
    these over a block to its loop bounds; on packed rows (contiguous runs of ids) the
    bounds are exact, with any ids they are safe (the tiles inside are still masked id by id).

    Computed with a sort over the B·(T + S) ids (each row's ids ranked to 0..T+S−1), then a
    scatter of the first and last positions per rank: O((T + S) log(T + S)) per row."""
    B, T = seg_q.shape
    S = seg_k.shape[1]
    ids = torch.cat([seg_q, seg_k], dim=1).long()  # (B, T + S)
    ordered, order = ids.sort(dim=1)
    first_of_run = torch.ones_like(ordered, dtype=torch.bool)
    first_of_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = torch.empty_like(order).scatter_(1, order, first_of_run.long().cumsum(1) - 1)  # (B, T + S)
    rank_q, rank_k = rank[:, :T], rank[:, T:]

    def spans(rank_pos: torch.Tensor, rank_ask: torch.Tensor, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=ids.device).expand(B, n)
        lo = torch.full((B, T + S), n, device=ids.device).scatter_reduce(1, rank_pos, pos, "amin")
        hi = torch.full((B, T + S), -1, device=ids.device).scatter_reduce(1, rank_pos, pos, "amax") + 1
        return torch.stack([lo.gather(1, rank_ask), hi.gather(1, rank_ask)], dim=1).to(torch.int32).contiguous()

    return spans(rank_k, rank_q, S), spans(rank_q, rank_k, T)


class _LaunchArgs:
    """What every kernel launch shares: the flags, the bias and mask pointers/strides, the
    block config (fixed under the interpreter, autotuned on a GPU)."""

    def __init__(self, q, k, bias, key_padding_mask, causal, scale, segments=None):
        B, H, T, D = q.shape
        self.B, self.H, self.T, self.D = B, H, T, D
        self.H_kv, self.S = k.shape[1], k.shape[2]
        self.group = H // self.H_kv
        self.scale = scale
        self.qk_scale = scale * LOG2E
        self.bias = q if bias is None else bias.expand(B, H, T, self.S)  # stride 0 on broadcast dims
        self.bias_strides = (0, 0, 0, 0) if bias is None else self.bias.stride()
        # contiguous (B, S) bytes, nonzero = may be attended
        self.kpm = q if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
        if segments is None:
            self.seg = (q, q, q, q)
        else:  # (B, T) and (B, S) ids, contiguous; then the (B, 2, T) and (B, 2, S) loop ranges
            seg_q, seg_k = (s.contiguous() for s in segments)
            self.seg = (seg_q, seg_k, *_segment_ranges(seg_q, seg_k))
        self.interp = interpreter_on()
        self.meta = dict(
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=bool(causal),
            HAS_BIAS=bias is not None, HAS_KPM=key_padding_mask is not None, HAS_SEG=segments is not None,
            FP32_DOTS=self.interp, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the default
        )
        # autotune key: the sequence lengths rounded up to a power of two, so that a new
        # length (generation, a ragged batch) does not re-run the tuning each time; + 1 when
        # the length is ragged (not a multiple of 128), whose candidates differ (`variant`)
        self.buckets = tuple(triton.next_power_of_2(n) + (n % 128 != 0) for n in (T, self.S))

    def launch(self, which, tuned, plain, rows, heads, *args, **extra):
        """Grid (blocks, heads, B): the blocks of `rows` ('T' or 'S') on the fast axis, so that
        programs resident together read the same head's K/V (or Q/dO) through L2."""
        n = self.T if rows == "T" else self.S
        if self.interp:
            bm, bn = INTERPRETER_BLOCKS[which]
            block = bm if rows == "T" else bn
            plain[(triton.cdiv(n, block), heads, self.B)](*args, *self.buckets, BLOCK_M=bm, BLOCK_N=bn,
                                                           **self.meta, **extra)
        else:
            key = "BLOCK_M" if rows == "T" else "BLOCK_N"
            tuned[lambda m: (triton.cdiv(n, m[key]), heads, self.B)](*args, *self.buckets, **self.meta, **extra)


def _forward_triton(q, k, v, a: _LaunchArgs):
    B, H, T, D, S = a.B, a.H, a.T, a.D, a.S
    o = _new((B, H, T, D), q)
    lse = _new((B, H, T), q, torch.float32)
    seg_q, seg_k, ranges_q, _ = a.seg
    a.launch("fwd", _attn_fwd_tuned, _attn_fwd_h, "T", H,
             q, k, v, o, lse, a.bias, a.kpm, seg_q, seg_k, ranges_q, *q.stride()[:3], *k.stride()[:3],
             *v.stride()[:3], *o.stride()[:3], *a.bias_strides, H, T, S, a.group, a.qk_scale)
    return o, lse


def _backward_triton(q, k, v, o, lse, do, a: _LaunchArgs, need_dq, need_dkdv, need_dbias):
    B, H, T, D, S, H_kv = a.B, a.H, a.T, a.D, a.S, a.H_kv
    do = _last_dim_unit(do)
    delta = _new((B, H, T), q, torch.float32)
    _attn_bwd_preprocess[(triton.cdiv(T, 64), H, B)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                                     HEAD_DIM=D, BLOCK_D=a.meta["BLOCK_D"], BLOCK_M=64)
    seg_q, seg_k, ranges_q, ranges_k = a.seg
    dq = dk = dv = ds = None
    if need_dkdv:
        dk, dv = _new(k.shape, k), _new(v.shape, v)
        a.launch("dkdv", _attn_bwd_dkdv_tuned, _attn_bwd_dkdv_h, "S", H_kv,
                 q, k, v, do, lse, delta, dk, dv, a.bias, a.kpm, seg_q, seg_k, ranges_k, *q.stride()[:3],
                 *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                 *a.bias_strides, H, T, S, a.group, a.qk_scale, a.scale)
    if need_dq or need_dbias:
        dq = _new(q.shape, q)
        # dS for the bias gradient: zeros, since the causal loop never visits the blocks
        # where dS is 0 anyway; fp32, (B, H, T, S) — the one O(T·S) buffer, only when asked
        ds = torch.zeros((B, H, T, S), dtype=torch.float32, device=q.device) if need_dbias else delta
        a.launch("dq", _attn_bwd_dq_tuned, _attn_bwd_dq_h, "T", H,
                 q, k, v, do, lse, delta, dq, a.bias, a.kpm, seg_q, seg_k, ranges_q, ds, *q.stride()[:3],
                 *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *a.bias_strides,
                 H, T, S, a.group, a.qk_scale, a.scale, STORE_DS=need_dbias)
    return dq, dk, dv, (ds if need_dbias else None)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, seg_q, seg_k, causal, scale):
        q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
        # the kernels fold the scale into the max-subtract, which needs scale >= 0:
        # scale · q·k = (−scale) · q·(−k), and dK flips back in the backward
        ctx.flip = scale < 0
        if ctx.flip:
            k, scale = -k, -scale
        segments = None if seg_q is None else (seg_q, seg_k)
        a = _LaunchArgs(q, k, bias, key_padding_mask, causal, scale, segments)
        o, lse = _forward_triton(q, k, v, a)
        ctx.save_for_backward(q, k, v, o, lse, bias, key_padding_mask, seg_q, seg_k)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so instead of a wrong answer
    def backward(ctx, do):
        q, k, v, o, lse, bias, key_padding_mask, seg_q, seg_k = ctx.saved_tensors
        segments = None if seg_q is None else (seg_q, seg_k)
        a = _LaunchArgs(q, k, bias, key_padding_mask, ctx.causal, ctx.scale, segments)
        need = ctx.needs_input_grad
        dq, dk, dv, ds = _backward_triton(q, k, v, o, lse, do, a, need[0], need[1] or need[2], need[3])
        if ctx.flip and dk is not None:
            dk = -dk
        dbias = ds.sum_to_size(bias.shape).to(bias.dtype) if ds is not None else None
        return dq, dk, dv, dbias, None, None, None, None, None


def attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, bias=None,
              segment_ids=None, segment_ids_k=None, backend="auto"):
    """softmax(scale · q kᵀ + bias + mask) v, differentiable in q, k, v and bias.

    q (B, H, T, D); k, v (B, H_kv, S, D) with H % H_kv == 0 (GQA / MQA when H_kv < H);
    returns (B, H, T, D) in q's dtype.

    causal            bottom-right aligned (FlashAttention ≥ 2.1): query i attends key j iff
                      j <= i + (S − T); the usual mask when T == S. For causal
                      self-attention in a model: attention(q, k, v, causal=True).
    softmax_scale     default 1 / sqrt(D).
    key_padding_mask  bool (B, S), True where a key may be attended.
    bias              additive, broadcastable to (B, H, T, S) (e.g. (1, H, T, S) relative
                      position bias, (B, 1, 1, S)); gets a gradient if it requires one (the
                      triton backend then stores dS in a (B, H, T, S) fp32 buffer).
    segment_ids       int32/int64 (B, T): document masking for packed sequences; query i
                      attends key j only if their ids are equal (and causality allows). The
                      keys carry the same ids (so T must equal S) unless
    segment_ids_k     int32/int64 (B, S) gives the keys' own ids (e.g. a cache of keys).
                      Any id values work (padding may take one of its own, e.g. -1), and ids
                      need not form contiguous runs; packed rows do, and then the triton
                      kernels visit only the tiles that hold a query-key pair of one segment.
    backend           "auto" (triton on CUDA, torch elsewhere), "torch" (PyTorch's SDPA; also
                      float64), "triton" (our kernels; fp16, bf16, fp32).

    Query rows with no key to attend (all masked) give 0 and zero gradients, never NaN.
    Inputs may have any strides as long as the head dim is contiguous (else it is copied);
    head dims 1..256 (padded to a power of two ≥ 16 inside the kernel). fp32 inputs run
    fp32 math (no TF32). No attention dropout.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    be = resolve_backend(backend, q)
    dtypes = _TORCH_DTYPES if be == "torch" else _TRITON_DTYPES
    scale = _validate(q, k, v, key_padding_mask, bias, softmax_scale, dtypes, segment_ids, segment_ids_k)
    segments = _segment_pair(segment_ids, segment_ids_k)
    if be == "torch":
        return _attention_torch(q, k, v, bool(causal), scale, key_padding_mask, bias, segments)
    seg_q, seg_k = (None, None) if segments is None else segments
    return _FlashAttention.apply(q, k, v, bias, key_padding_mask, seg_q, seg_k, bool(causal), scale)


def _causal_fraction(T: int, S: int) -> float:
    """Share of the T×S score matrix a bottom-right causal mask keeps: 1/2 when T == S (the
    convention of FlashAttention's benchmarks), the exact count otherwise."""
    if T == S:
        return 0.5
    # row i sees min(S, max(0, i + S − T + 1)) keys
    visible = T * (S - T + 1) + T * (T - 1) / 2 if T < S else S * (S + 1) / 2
    return visible / (T * S)


_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def flops(B: int, H: int, T: int, S: int, D: int, *, causal: bool = False, mode: str = "fwd") -> float:
    """Matmul FLOPs: forward 4·B·H·T·S·D (QKᵀ and PV, 2 FLOPs per multiply-add); backward
    2.5× the forward (FlashAttention-2's convention: dV, dP, dQ, dK plus the recomputation of
    S); fwd+bwd 3.5×. Causal counts only the visible part (half when T == S)."""
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_MODE_FACTOR)}, got {mode!r}")
    f = 4.0 * B * H * T * S * D * _MODE_FACTOR[mode]
    return f * _causal_fraction(T, S) if causal else f


def bytes_moved(B: int, H: int, H_kv: int, T: int, S: int, D: int, *, dtype_bytes: int = 2,
                mode: str = "fwd") -> float:
    """The HBM traffic the fused kernels need at least (each tensor read or written once):
    forward reads Q, K, V and writes O and the fp32 LSE; backward reads Q, K, V, O, dO and
    the LSE, writes and reads D = rowsum(dO ∘ O) (fp32), writes dQ, dK, dV."""
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_MODE_FACTOR)}, got {mode!r}")
    q = B * H * T * D * dtype_bytes  # Q, O, dO, dQ each
    kv = B * H_kv * S * D * dtype_bytes  # K, V, dK, dV each
    row = B * H * T * 4  # LSE, D each (fp32)
    fwd = 2 * q + 2 * kv + row  # Q, K, V in; O, LSE out
    bwd = 4 * q + 4 * kv + 3 * row  # Q, O, dO in, dQ out; K, V in, dK, dV out; LSE in, D out + in
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])
