"""RMSNorm, fused in Triton: forward, backward, and the pre-norm residual variant.

Forward — Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (arXiv
1910.07467), eq. 4, for each row x ∈ R^N (normalized over the last dim). It is LayerNorm
without the re-centering: no mean, no bias. As every implementation does, ε goes inside
the root:

    r    = sqrt((1/N) Σ_j x_j² + ε)        rstd := 1 / r
    x̂_j  = x_j · rstd
    y_j  = x̂_j · w_j

Backward. With g = dy ∘ w and ∂x̂_j/∂x_k = rstd · (δ_jk − x̂_j x̂_k / N):

    dx = rstd · (g − x̂ · mean(g ∘ x̂))
    dw = Σ_rows dy ∘ x̂

The residual variant: h = x + residual (returned: the new residual stream), y = RMSNorm(h);
in the backward d(x) = d(residual) = dh + dx_RMS(dy).

The I/O argument. ~4 FLOPs per element forward and ~9 backward against 4 bytes moved
(bf16: read x, write y): about 1 FLOP/byte, so the time is the bytes. Fused:

    forward   read x, write y (+ rstd: 4 bytes per row)            4 bytes/elem in bf16
    backward  read x, dy, write dx (+ dw partials per program)     6 bytes/elem

The reference below as separate PyTorch ops (square, mean, add, rsqrt, multiply,
multiply) makes ~6 passes over HBM forward and more backward, where autograd also saves
the intermediates; the residual variant saves the re-read of h forward and the write +
read of dx_RMS backward, as in ltk/kernels/layernorm.py.

Numerics: the statistics and y are computed in fp32 and y is rounded once to the input
dtype. (Hugging Face's Llama RMSNorm rounds x̂ to the input dtype before multiplying by w,
so its results can differ from these by an ulp.)

The kernels follow the design of ltk/kernels/layernorm.py (whole rows in registers, ROWS ×
BLOCK_N tiles for short rows, a persistent backward that reads each tile once and writes
(programs, N) fp32 partials of dw that torch sums: deterministic, no atomics; CHUNK-wide
walks for rows too wide for the registers); the launch heuristics and input checks both
use are in ltk/kernels/norm_common.py. Inputs that are not contiguous are copied with `.contiguous()` first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.kernels.backend import HAS_TRITON
from ltk.kernels.norm_common import (
    CHUNK,
    ONE_PASS_TILE,
    as_dtype,
    as_rows,
    bwd_programs,
    check_mode,
    check_norm_inputs,
    launch_config,
    on_device,
)
from ltk.kernels.poison import output_allocator

# ---------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _ONE_PASS_TILE = tl.constexpr(ONE_PASS_TILE)  # globals a kernel reads must be constexprs
    _CHUNK = tl.constexpr(CHUNK)

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, R, W, Y, H, RSTD,  # pointers; R and H unused unless HAS_RESIDUAL
        M, N, eps,
        HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program `pid` normalizes rows [pid·ROWS, pid·ROWS + ROWS) of the (M, N) input."""
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)                     # (ROWS,)
        cols = tl.arange(0, BLOCK_N)                               # (BLOCK_N,)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]                   # (ROWS, BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]      # int64: M·N may pass 2**31

        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # padding loads 0: adds 0 to Σx²
        if HAS_RESIDUAL:
            h = (x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + offs, h, mask=mask)
            x = h.to(tl.float32)  # normalize h as stored, exactly the tensor the model sees

        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)           # (ROWS,)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_norm_bwd_kernel(
        X, W, RSTD, DY, DH, DX, DW_PART,  # DH unused unless HAS_DH
        M, N,
        HAS_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program `pid` of P handles row tiles pid, pid + P, ...: it writes dx for them and
        row `pid` of the (P, N) partial sums of dw. Per tile, with x̂ = x · rstd (rstd saved
        by the forward) and g = dy ∘ w:

            c  = mean(g ∘ x̂)              one reduction over the row
            dx = rstd · (g − x̂ · c)        an FFMA and an FMUL an element
            dw_part += dy ∘ x̂              fp32

        Tiles of up to ONE_PASS_TILE elements take one pass: x and dy are read once and stay
        in registers across the reduction, w is read once before the loop, and dw_part is a
        register accumulator written once at the end. Wider rows (BLOCK_N > ONE_PASS_TILE)
        would not fit the register file: `_rms_bwd_chunked` walks them in CHUNK-wide pieces."""
        if ROWS * BLOCK_N > _ONE_PASS_TILE:
            _rms_bwd_chunked(X, W, RSTD, DY, DH, DX, DW_PART, M, N, HAS_DH)
        else:
            _rms_bwd_one_pass(X, W, RSTD, DY, DH, DX, DW_PART, M, N, HAS_DH, ROWS, BLOCK_N)

    @triton.jit
    def _rms_bwd_one_pass(X, W, RSTD, DY, DH, DX, DW_PART, M, N,
                          HAS_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        local = tl.arange(0, ROWS)[:, None] * N + cols[None, :]  # (ROWS, BLOCK_N) offsets within a tile
        inv_n = 1.0 / N  # once, not a division per tile
        dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # lives in registers for the whole loop
        if not HAS_DH:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_N), once

        for tile in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            start = tl.cast(tile * ROWS, tl.int64) * N  # the tile's first element: M·N may pass 2**31
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]               # (ROWS, 1)
            x = tl.load(X + start + local, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + local, mask=mask, other=0.0).to(tl.float32)
            if HAS_DH:  # w read per tile (from the caches): its registers go to dh's, no spills
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            xhat = x * rstd       # padding: x = 0, dy = 0, so it adds nothing to c or dw
            g = dy * w
            dw_acc += dy * xhat   # before the reduction: dy is then dead, fewer values live across it
            c = tl.sum(g * xhat, axis=1)[:, None] * inv_n                             # (ROWS, 1)
            dx = (g - xhat * c) * rstd
            if HAS_DH:  # residual variant: the gradient reaching h from outside joins here
                dx += tl.load(DH + start + local, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + start + local, dx.to(DX.dtype.element_ty), mask=mask)

        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)

    @triton.jit
    def _rms_bwd_chunked(X, W, RSTD, DY, DH, DX, DW_PART, M, N, HAS_DH: tl.constexpr):
        """Rows wider than ONE_PASS_TILE, one row at a time in CHUNK-wide pieces: a first walk
        sums g ∘ x̂, a second reads x, dy, w again (from the L1/L2 caches: the row was just
        read) for dx, and adds dy ∘ x̂ to the program's row of DW_PART in memory (written on
        the program's first row, read and written after; it stays in the caches)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, _CHUNK)
        inv_n = 1.0 / N
        dw_row = DW_PART + pid * N
        for row in range(pid, M, tl.num_programs(0)):
            start = tl.cast(row, tl.int64) * N  # M·N may pass 2**31
            rstd = tl.load(RSTD + row)
            acc = tl.zeros((_CHUNK,), dtype=tl.float32)
            for c0 in range(0, N, _CHUNK):
                ok = c0 + cols < N
                x = tl.load(X + start + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                dy = tl.load(DY + start + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                w = tl.load(W + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                acc += dy * w * x
            c_rstd = tl.sum(acc, axis=0) * inv_n * rstd * rstd  # c·rstd, with c = mean(g ∘ x̂) = rstd·mean(g ∘ x)
            for c0 in range(0, N, _CHUNK):
                ok = c0 + cols < N
                x = tl.load(X + start + c0 + cols, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                dy = tl.load(DY + start + c0 + cols, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                w = tl.load(W + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = dy * w * rstd - xhat * c_rstd
                if HAS_DH:
                    dx += tl.load(DH + start + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(DX + start + c0 + cols, dx.to(DX.dtype.element_ty), mask=ok)
                later = tl.full((_CHUNK,), row, tl.int32) > pid  # false on the first row: the partial starts at 0
                dw = tl.load(dw_row + c0 + cols, mask=ok & later, other=0.0)
                tl.store(dw_row + c0 + cols, dw + dy * xhat, mask=ok)
            tl.debug_barrier()  # the next row's read of dw_row sees this row's writes


POISON_OUTPUTS = False             # NaN-filled outputs (tests, the GPU check): see ltk/kernels/poison.py
_empty = output_allocator(__name__)


# ---------------------------------------------------------------------------------------
# 3. Plain-PyTorch references (the ground truth of the tests; any dtype)
# ---------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The forward equations above, one PyTorch op each, in x's dtype."""
    rstd = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)   # (..., 1)
    return x * rstd * weight


def rms_norm_residual_reference(x, residual, weight, eps: float = 1e-6):
    """(y, h) with h = x + residual and y = RMSNorm(h)."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


# ---------------------------------------------------------------------------------------
# 4. Autograd function and public API
# ---------------------------------------------------------------------------------------
def _rms_norm_fwd(x, residual, weight, eps):
    """Launch the forward on (M, N) contiguous tensors; returns y, h (or None), rstd."""
    m, n = x.shape
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)  # h's and y's
    y = _empty((m, n), dtype, x.device)
    h = _empty((m, n), dtype, x.device) if residual is not None else None
    rstd = _empty((m,), torch.float32, x.device)
    if m > 0:
        block_n, rows, num_warps = launch_config(m, n)
        _rms_norm_fwd_kernel[(triton.cdiv(m, rows),)](
            x, residual if residual is not None else x, weight, y, h if h is not None else y, rstd,
            m, n, eps, HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y, h, rstd


def _rms_norm_bwd(x, weight, rstd, dy, dh):
    """Launch the backward; returns dx (with dh added when given) and dw."""
    m, n = x.shape
    dx = _empty((m, n), x.dtype, x.device)
    block_n, rows, num_warps = launch_config(m, n, backward=True)
    programs = bwd_programs(m, n, x.device) if m > 0 else 0
    dw_part = _empty((programs, n), torch.float32, x.device)
    if m > 0:
        _rms_norm_bwd_kernel[(programs,)](
            x, weight, rstd, dy, dh if dh is not None else dy, dx, dw_part, m, n,
            HAS_DH=dh is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return dx, dw_part.sum(0).to(weight.dtype)  # (programs, N) -> (N,), deterministic


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) — or, given a residual, (y, h) = (RMSNorm(h), h) with h = x + residual —
    for x of shape (..., N), with the Triton kernels above. The kernels see (M, N) rows."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape, x2 = x.shape, as_rows(x)                         # (M, N)
        weight = weight.contiguous()                             # the kernels index it as w[col]
        with on_device(x):
            y, h, rstd = _rms_norm_fwd(x2, as_rows(residual), weight, eps)
        ctx.shape, ctx.has_residual = shape, residual is not None
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h if ctx.has_residual else x2, weight, rstd)
        return (y.view(shape), h.view(shape)) if ctx.has_residual else y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        xin, weight, rstd = ctx.saved_tensors
        if dy is None:  # only h was used: nothing flows through the norm
            dx, dw = dh, torch.zeros_like(weight)
        else:
            with on_device(xin):
                dx, dw = _rms_norm_bwd(xin, weight, rstd, as_rows(dy), as_rows(dh))
            dx = dx.view(ctx.shape)
        # h = x + residual: both receive the same gradient, as from torch's own add
        if not ctx.has_residual:
            return dx, None, dw, None
        return as_dtype(dx, ctx.dtypes[0]), as_dtype(dx, ctx.dtypes[1]), dw, None


def _torch_rms_norm(h, weight, eps):
    if weight.dtype != h.dtype:  # fp32 weights with fp16/bf16 activations
        weight = weight.to(h.dtype)
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    return rms_norm_reference(h, weight, eps)  # pragma: no cover - older torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim of x (..., N) with weight (N,). Returns a tensor of x's
    shape and dtype. See the module docstring for the math."""
    backend = check_norm_inputs(x, None, weight, None, eps, backend)
    if backend == "torch":
        return _torch_rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, None, weight, float(eps))


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) with h = x + residual (the new residual stream) and y = RMSNorm(h).
    Gradients from both y and h flow back to x and residual. h and y take the dtype of
    x + residual (torch's type promotion: bf16 + fp32 -> fp32)."""
    backend = check_norm_inputs(x, residual, weight, None, eps, backend)
    if backend == "torch":
        h = x + residual
        return _torch_rms_norm(h, weight, eps), h
    return RMSNormFunction.apply(x, residual, weight, float(eps))


# ---------------------------------------------------------------------------------------
# 5. Cost model
# ---------------------------------------------------------------------------------------
def flops(rows: int, cols: int, *, mode: str = "fwd", residual: bool = False) -> int:
    """Floating-point operations per element (per-row sqrt/divide neglected): forward 4
    (square and sum; times rstd; times w), backward 9 (x̂: 1; g = dy·w: 1; Σg·x̂: 2; dx: 3;
    dw: 2); the residual adds 1 each way (x + residual; dh + dx)."""
    check_mode(mode)
    per = {"fwd": 4, "bwd": 9, "fwd+bwd": 13}[mode]
    if residual:
        per += {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]
    return per * rows * cols


def bytes_moved(rows: int, cols: int, *, dtype_bytes: int = 2, mode: str = "fwd",
                residual: bool = False) -> int:
    """The minimum HBM traffic of the fused kernels, in bytes (weight in the activations'
    dtype; rstd in fp32, 4 bytes a row):

    forward   read x (+ residual), w; write y (+ h), rstd
    backward  read x (h for the residual variant), dy (+ dh), w, rstd; write dx, dw
    (the dw partial buffer is implementation overhead, not counted)."""
    check_mode(mode)
    act = rows * cols * dtype_bytes       # one activation tensor
    vec = cols * dtype_bytes              # the (N,) weight
    stats = rows * 4
    fwd = (2 + 2 * residual) * act + vec + stats
    bwd = (3 + residual) * act + 2 * vec + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
