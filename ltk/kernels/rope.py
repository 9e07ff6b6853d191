"""Rotary position embedding (RoPE) on q and k, fused in Triton: forward, backward, in place.

Su et al. 2021, "RoFormer" (arXiv 2104.09864), §3.4.2, eq. 34: pair i of a head at position m is
rotated by the angle m·θ_i. Pairs here are (i, i + D/2), the "rotate half" layout of
transformers' Llama and of ltk/models/llama.py (`rope_cos_sin`: cos = [cos mθ_0 .. cos mθ_{D/2−1},
the same again], sin likewise). With x = [x₁, x₂] (two halves of D/2) and c = [c₁, c₂], s = [s₁, s₂]:

    forward   y = x ∘ c + rotate_half(x) ∘ s,   rotate_half(x) = [−x₂, x₁]
              y₁ = x₁ c₁ − x₂ s₁
              y₂ = x₂ c₂ + x₁ s₂

    backward  y = (C + S R) x is linear in x (C, S diagonal, R = [[0, −I], [I, 0]]), so
              dx = (C + Rᵀ S) dy:
              dx₁ = dy₁ c₁ + dy₂ s₂
              dx₂ = dy₂ c₂ − dy₁ s₁
              With RoPE's c₁ = c₂, s₁ = s₂ this is the rotation by −m·θ_i. The kernels read both
              halves of cos and sin, so they compute exactly the formula above for any cos, sin.

Shapes: q (B, Hq, T, D), k (B, Hkv, T, D) (grouped-query attention: Hkv divides Hq), any strides
(the models pass the (B, T, H, D) -> (B, H, T, D) transpose views of their projections);
cos, sin (T, D), (B, T, D) or (B, 1, T, D) (a batch dim of 1 broadcasts), one row per position:
a decode step's offset, packed sequences whose positions restart, any positions at all are the
caller's choice of rows. cos and sin are constants (no gradient flows to them).

`inplace=True` writes the rotated values into q and k (autograd is told: `mark_dirty`; a launch
each, as autograd allows a Function that modifies a view in place only one output), and the
backward rotates the incoming gradients in place where that is safe: when autograd holds the only
reference to them (the test AccumulateGrad uses to steal a gradient), so a gradient a caller or
another node still reads is never overwritten; otherwise it writes new tensors. Out of place, one
launch rotates q and k together.

The I/O argument: 2 FLOPs + 1 add an element against, in bf16, 4 bytes moved (read x, write y),
plus cos and sin (T·D each, shared by every head and batch row: from the caches). Eager PyTorch
(the reference below) runs chunk, neg, cat, two products and a sum: ~5 passes over q and k
forward, and its backward as many. One program handles BLOCK_T tokens of one sequence: it loads
their cos and sin rows once, then walks q's heads and k's heads in blocks of HB heads
(`launch_config`: at Llama sizes one token and all 32 query heads, at the tests' a few tokens).
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import HAS_TRITON, check_float, check_same_device, resolve_backend
from ltk.kernels.norm_common import check_mode, next_pow2, on_device
from ltk.kernels.poison import poisoning

TILE = 2048       # elements of one half-head tile (HB heads × BLOCK_HALF): 16 fp32 values a thread per half
NUM_WARPS = 4
INT32_REACH = 2**31  # offsets within a program's tile at or past this are computed in int64

# ---------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, Y, H, sxh, sxt, sxd, syh, syt, syd, t_ok, c1, c2, s1, s2, HALF,
                      BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HB: tl.constexpr, BACKWARD: tl.constexpr,
                      OFFS_64: tl.constexpr):
        """Rotate heads [0, H) of BLOCK_T tokens: X and Y point at the first token's (head 0, dim 0);
        c1 .. s2 are the tokens' (1, BLOCK_T, BLOCK_HALF) halves of cos and sin. Offsets from X and
        Y in int32 (a third of the integer instructions of int64) unless OFFS_64: the launcher's
        bound on them passes 2**31."""
        tt = tl.arange(0, BLOCK_T)[None, :, None]
        if OFFS_64:
            tt = tt.to(tl.int64)
        cols = tl.arange(0, BLOCK_HALF)[None, None, :]
        inner = t_ok & (cols < HALF)                                            # (1, BLOCK_T, BLOCK_HALF)
        for h0 in range(0, H, HB):
            heads = (h0 + tl.arange(0, HB))[:, None, None]
            mask = (heads < H) & inner                                          # (HB, BLOCK_T, BLOCK_HALF)
            if OFFS_64:
                heads = heads.to(tl.int64)
            xo = heads * sxh + tt * sxt + cols * sxd
            x1 = tl.load(X + xo, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(X + xo + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:                      # dx = (C + Rᵀ S) dy
                y1 = x1 * c1 + x2 * s2
                y2 = x2 * c2 - x1 * s1
            else:                             # y = (C + S R) x
                y1 = x1 * c1 - x2 * s1
                y2 = x2 * c2 + x1 * s2
            yo = heads * syh + tt * syt + cols * syd
            # all loads of a tile come before its stores, and tiles do not overlap: safe with Y = X
            tl.store(Y + yo, y1.to(Y.dtype.element_ty), mask=mask)
            tl.store(Y + yo + HALF * syd, y2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, T, HQ, HK, HALF,
                     sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                     sob, soh, sot, sod, spb, sph, spt, spd,
                     scb, sct, scd, ssb, sst, ssd,
                     BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HBQ: tl.constexpr, HBK: tl.constexpr,
                     BACKWARD: tl.constexpr, OFFS_64: tl.constexpr):
        """Program pid rotates tokens [t0, t0 + BLOCK_T) of sequence b of q (into QO) and k (into KO),
        (b, t0 / BLOCK_T) = divmod(pid, ⌈T / BLOCK_T⌉)."""
        pid = tl.program_id(0)
        n_tb = tl.cdiv(T, BLOCK_T)
        b = (pid // n_tb).to(tl.int64)
        t0 = ((pid % n_tb) * BLOCK_T).to(tl.int64)
        tt = tl.arange(0, BLOCK_T)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        t_ok = t0 + tt < T
        ok = t_ok & (cols < HALF)                                               # (BLOCK_T, BLOCK_HALF)
        cp = COS + b * scb + (t0 + tt) * sct + cols * scd   # these positions' rows (scb = 0: shared by the batch)
        sp = SIN + b * ssb + (t0 + tt) * sst + cols * ssd
        c1 = tl.load(cp, mask=ok, other=0.0).to(tl.float32)[None, :, :]          # (1, BLOCK_T, BLOCK_HALF)
        c2 = tl.load(cp + HALF * scd, mask=ok, other=0.0).to(tl.float32)[None, :, :]
        s1 = tl.load(sp, mask=ok, other=0.0).to(tl.float32)[None, :, :]
        s2 = tl.load(sp + HALF * ssd, mask=ok, other=0.0).to(tl.float32)[None, :, :]
        t_ok3 = t_ok[None, :, :]
        _rotate_heads(Q + b * sqb + t0 * sqt, QO + b * sob + t0 * sot, HQ, sqh, sqt, sqd, soh, sot, sod,
                      t_ok3, c1, c2, s1, s2, HALF, BLOCK_T, BLOCK_HALF, HBQ, BACKWARD, OFFS_64)
        _rotate_heads(K + b * skb + t0 * skt, KO + b * spb + t0 * spt, HK, skh, skt, skd, sph, spt, spd,
                      t_ok3, c1, c2, s1, s2, HALF, BLOCK_T, BLOCK_HALF, HBK, BACKWARD, OFFS_64)


POISON_OUTPUTS = False             # NaN-filled outputs (tests, the GPU check): see ltk/kernels/poison.py


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """An output of t's shape, dtype and (dense) strides, so the caller's layout carries through."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if poisoning(__name__) else out


# ---------------------------------------------------------------------------------------
# 2. Plain-PyTorch reference (the torch backend; the tests run it in float64)
# ---------------------------------------------------------------------------------------
def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D); cos, sin broadcastable to it ((T, D) or (B, 1, T, D)).
    x' = x∘cos + rotate_half(x)∘sin: pair (x_i, x_{i+D/2}) -> (x_i cos − x_{i+D/2} sin,
    x_{i+D/2} cos + x_i sin). In x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, heads, T, D/2)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, heads, T, D)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------
# 3. Autograd function and public API
# ---------------------------------------------------------------------------------------
def _as_btd(t: torch.Tensor) -> torch.Tensor:
    """cos or sin as (Bc, T, D), Bc ∈ {1, B}: (T, D) -> (1, T, D); (B, 1, T, D) -> (B, T, D). A view."""
    if t.dim() == 2:
        return t[None]
    return t[:, 0] if t.dim() == 4 else t


def launch_config(seq: int, heads_q: int, heads_kv: int, half: int, *, interpreter: bool = False):
    """(BLOCK_HALF, HBQ, HBK, BLOCK_T): the kernel's tile is HB heads × BLOCK_T tokens × BLOCK_HALF
    dims (each half of the head), up to TILE elements (16 fp32 values a thread per half with 4
    warps); heads first, so cos and sin are loaded once for as many heads as fit, then tokens, so
    a model with few heads still gives each program a full tile. The interpreter takes 64× the
    tile: it runs programs one after another, each op at a fixed cost, so fewer is faster."""
    tile = TILE * (64 if interpreter else 1)
    block_half = next_pow2(half)
    per_tile = max(1, tile // block_half)
    hbq, hbk = min(next_pow2(max(heads_q, 1)), per_tile), min(next_pow2(max(heads_kv, 1)), per_tile)
    block_t = min(next_pow2(max(seq, 1)), max(1, per_tile // max(hbq, hbk)))
    return block_half, hbq, hbk, block_t


def _launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    """Rotate q -> qo and k -> ko (either may be None: nothing to do for it) with (Bc, T, D) cos, sin."""
    x = q if q is not None else k
    B, _, T, D = x.shape
    hq, hk = (q.shape[1] if q is not None else 0), (k.shape[1] if k is not None else 0)
    if B * T == 0 or hq + hk == 0:
        return
    half = D // 2
    block_half, hbq, hbk, block_t = launch_config(T, hq, hk, half, interpreter=not x.is_cuda)
    # a missing tensor: its loop runs 0 times; any valid pointer and strides stand in for it
    q, qo = (q, qo) if q is not None else (k, ko)
    k, ko = (k, ko) if k is not None else (q, qo)
    # the largest offset a program adds to its token's base pointer (the base itself is int64)
    reach = max((t.shape[1] - 1) * abs(t.stride(1)) + (T - 1) * abs(t.stride(2)) + (D - 1) * abs(t.stride(3))
                for t in (q, k, qo, ko))
    bc = cos.shape[0]
    scos = (cos.stride(0) if bc > 1 else 0, cos.stride(1), cos.stride(2))
    ssin = (sin.stride(0) if bc > 1 else 0, sin.stride(1), sin.stride(2))
    with on_device(x):
        _rope_kernel[(B * triton.cdiv(T, block_t),)](
            q, k, qo, ko, cos, sin, T, hq, hk, half, *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *scos,
            *ssin, BLOCK_T=block_t, BLOCK_HALF=block_half, HBQ=hbq, HBK=hbk, BACKWARD=backward,
            OFFS_64=reach >= INT32_REACH, num_warps=NUM_WARPS)


def _sole_owner(t: torch.Tensor) -> bool:
    """True when nothing but the caller references t or its memory (so it may be overwritten): one
    reference to the tensor, not a view, its storage shared with no other tensor, no element
    aliased within it. Private PyTorch counters, read defensively: when unsure, False."""
    try:
        if t._use_count() != 1 or t._is_view() or torch._debug_has_internal_overlap(t) != 0:
            return False
        storage = t.untyped_storage()
        return torch._C._storage_Use_Count(storage._cdata) <= 2  # the tensor's + the `storage` object's
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - another PyTorch
        return False


class RoPEFunction(torch.autograd.Function):
    """(q', k') = RoPE(q), RoPE(k) into new tensors with the Triton kernel above: one launch for both."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = _as_btd(cos), _as_btd(sin)
        qo, ko = _empty_like(q), _empty_like(k)
        _launch(q, k, qo, ko, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        out = [None if d is None else _empty_like(d) for d in (dq, dk)]
        _launch(dq, dk, out[0], out[1], cos, sin, backward=True)
        return out[0], out[1], None, None


class RoPEInPlaceFunction(torch.autograd.Function):
    """x' = RoPE(x) written into x (q or k). One tensor a call: autograd lets a Function that
    modifies a view in place (the models' q and k are views of their projections) return only
    one, so q and k take a launch each. The backward rotates dx in place where that is safe."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = _as_btd(cos), _as_btd(sin)
        _launch(x, None, x, None, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dx = dy if _sole_owner(dy) else _empty_like(dy)
        _launch(dy, None, dx, None, cos, sin, backward=True)
        return dx, None, None


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, cos, sin, inplace, backend) -> str:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t, _TORCH_DTYPES)
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, time, head_dim); got {tuple(t.shape)}")
    (B, hq, T, D), hk = q.shape, k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"q has shape {tuple(q.shape)} and k {tuple(k.shape)}: batch, time and head_dim must match")
    if hk == 0 or hq % hk:
        raise ValueError(f"q's {hq} heads must be a multiple of k's {hk} (grouped-query attention)")
    if D % 2:
        raise ValueError(f"RoPE rotates pairs: head_dim must be even, got {D}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos has shape {tuple(cos.shape)}, sin has {tuple(sin.shape)}: they must match")
    ok = {2: (T, D), 3: (None, T, D), 4: (None, 1, T, D)}.get(cos.dim())
    if ok is None or any(want is not None and got != want for got, want in zip(cos.shape, ok)) or \
            (cos.dim() > 2 and cos.shape[0] not in (1, B)):
        raise ValueError(f"cos and sin must have shape (T, D), (B, T, D) or (B, 1, T, D) with T={T}, D={D}, "
                         f"B={B} or 1; got {tuple(cos.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin are constants here: no gradient flows to them (detach them)")
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    backend = resolve_backend(backend, q)
    if backend == "triton":
        for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
            check_float(name, t, _TRITON_DTYPES)
    if inplace:
        for name, t in (("q", q), ("k", k)):
            if torch._debug_has_internal_overlap(t) != 0:
                raise ValueError(f"inplace=True: {name} has elements that share memory (an expanded tensor?)")
        if q.numel() and q.data_ptr() == k.data_ptr():
            raise ValueError("inplace=True: q and k are the same memory")
    return backend


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               inplace: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(RoPE(q), RoPE(k)) for q (B, Hq, T, D), k (B, Hkv, T, D) and per-position cos, sin of shape
    (T, D), (B, T, D) or (B, 1, T, D) in the rotate-half layout (the module docstring). Outputs
    keep q's and k's dtypes and strides; with `inplace` they are q and k, rotated in place."""
    backend = _check(q, k, cos, sin, inplace, backend)
    if backend == "torch":
        if cos.dim() == 3:  # (B, T, D) -> (B, 1, T, D): broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        qo, ko = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
        return (q.copy_(qo), k.copy_(ko)) if inplace else (qo, ko)
    if inplace:
        return RoPEInPlaceFunction.apply(q, cos, sin), RoPEInPlaceFunction.apply(k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)


# ---------------------------------------------------------------------------------------
# 4. Cost model
# ---------------------------------------------------------------------------------------
def flops(batch: int, heads_q: int, heads_kv: int, seq: int, head_dim: int, *, mode: str = "fwd") -> int:
    """3 FLOPs an element of q and k each way (two products, one sum)."""
    check_mode(mode)
    n = batch * (heads_q + heads_kv) * seq * head_dim
    return {"fwd": 3 * n, "bwd": 3 * n, "fwd+bwd": 6 * n}[mode]


def bytes_moved(batch: int, heads_q: int, heads_kv: int, seq: int, head_dim: int, *, dtype_bytes: int = 2,
                cos_bytes: int | None = None, cos_batch: int = 1, mode: str = "fwd") -> int:
    """The least HBM traffic of one pass (the backward moves the same): read q and k, write q' and
    k' (dq, dk), read cos and sin once ((cos_batch, T, D) each, in cos_bytes, default dtype_bytes)."""
    check_mode(mode)
    act = batch * (heads_q + heads_kv) * seq * head_dim * dtype_bytes
    table = 2 * cos_batch * seq * head_dim * (cos_bytes or dtype_bytes)
    one = 2 * act + table
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]
