"""LayerNorm, fused in Triton: forward, backward, and the pre-norm residual variant.

Forward — Ba, Kiros & Hinton 2016, "Layer Normalization" (arXiv 1607.06450), section 3,
eq. 3 (the statistics), applied to each row x ∈ R^N of the input (normalized over the
last dim), followed by the elementwise gain w and bias b:

    μ    = (1/N) Σ_j x_j
    σ²   = (1/N) Σ_j (x_j − μ)²
    rstd = 1 / sqrt(σ² + ε)
    x̂_j  = (x_j − μ) · rstd
    y_j  = x̂_j · w_j + b_j

Backward. Write g = dy ∘ w (the gradient reaching x̂). Differentiating x̂ through μ and σ,

    ∂x̂_j/∂x_k = rstd · (δ_jk − 1/N − x̂_j x̂_k / N)

so, with mean(·) taken over the row,

    dx = rstd · (g − mean(g) − x̂ · mean(g ∘ x̂))
    dw = Σ_rows dy ∘ x̂
    db = Σ_rows dy

The residual variant (every pre-norm transformer block does this) adds first:

    h = x + residual          (the new residual stream, returned)
    y = LayerNorm(h)

and in the backward both gradients meet in h: dh_total = dh + dx_LN(dy), and
d(x) = d(residual) = dh_total.

The I/O argument. Per element the op does ~7 FLOPs forward and ~13 backward, against
2 bytes read + 2 written (bf16) forward: about 2 FLOP/byte, two orders of magnitude below
what a GPU can compute per byte of HBM traffic. The time is the bytes moved, so the
kernel's job is to touch each byte once:

    forward   read x, write y (+ mean, rstd: 8 bytes per row)      4 bytes/elem in bf16
    backward  read x, dy, write dx (+ dw, db partials per program) 6 bytes/elem

Written as separate PyTorch ops (`layer_norm_reference` below: mean, subtract, square,
mean, rsqrt, multiply, multiply, add) each op reads and writes a whole tensor: ~8 passes
over HBM forward instead of 2. PyTorch's own fused `F.layer_norm` reads x and dy twice in
its backward (one kernel for dx, another for dw/db): 10 bytes/elem instead of 6. With
the residual: unfused, `h = x + r` reads 2 and writes 1 tensor, then LayerNorm reads h
again (5 passes); fused, x and r are read, h and y written (4 passes) — and in the
backward the fused kernel adds dh itself instead of writing dx_LN and then reading it
back for the add (saving a full write + read).

Design of the kernels (one row = one (N,) slice, held whole in registers):
  * BLOCK_N = next power of two ≥ N, up to MAX_WIDTH; one program holds ROWS × BLOCK_N,
    with ROWS > 1 for short rows (about _TILE elements a program), so that a width of 128
    does not launch one tiny program per row; num_warps by tile size (`_launch_config`);
  * statistics in fp32 whatever the input dtype: load, `.to(tl.float32)`, compute, cast
    on store;
  * the backward runs a fixed number of programs (one to a few per SM; 4 under the
    interpreter), each looping over its share of row tiles, accumulating dw and db in fp32
    registers and writing one (N,) partial row; torch sums the (programs, N) partials. No
    atomics, so the result is deterministic on a given device. A tile of up to
    ONE_PASS_TILE elements is read once: x and dy stay in registers across the two row
    reductions and w is read once before the loop (Liger-Kernel's design, ~17 SASS an
    element on sm_90 in bf16 against its ~20: the report of `ltk bench kernel-static`).
    Wider rows are walked in CHUNK-wide pieces (norm_common): read twice, the second time
    from the L1/L2 caches, with the partials accumulated in memory: no spills in the loops.

Inputs that are not contiguous are copied with `.contiguous()` first (correct; one extra
pass). Output dtype = input dtype (for the residual variant, that of x + residual); weight
and bias may also be fp32 under fp16/bf16 activations. The backend is chosen by
`kernels.backend.resolve_backend`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.kernels.backend import HAS_TRITON
from ltk.kernels.norm_common import (
    CHUNK,
    MAX_WIDTH,  # noqa: F401  (the widest row, part of this op's interface)
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
    def _layer_norm_fwd_kernel(
        X, R, W, B, Y, H, MEAN, RSTD,  # pointers; R, B, H unused unless the flags say so
        M, N, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program `pid` normalizes rows [pid·ROWS, pid·ROWS + ROWS) of the (M, N) input."""
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)                     # (ROWS,)
        cols = tl.arange(0, BLOCK_N)                               # (BLOCK_N,)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]                   # (ROWS, BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]      # int64: M·N may pass 2**31

        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = (x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + offs, h, mask=mask)
            x = h.to(tl.float32)  # normalize h as stored, exactly the tensor the model sees

        mean = tl.sum(x, axis=1) / N                               # (ROWS,)
        xc = tl.where(mask, x - mean[:, None], 0.0)                # padding must not count in σ²
        var = tl.sum(xc * xc, axis=1) / N
        rstd = tl.rsqrt(var + eps)

        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd_kernel(
        X, W, MEAN, RSTD, DY, DH, DX, DW_PART, DB_PART,  # DH unused unless HAS_DH, DB_PART unless HAS_BIAS
        M, N,
        HAS_DH: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program `pid` of P handles row tiles pid, pid + P, pid + 2P, ...: it writes dx for
        them and row `pid` of the (P, N) partial sums of dw (and db). Per tile, with
        x̂ = (x − μ) · rstd = x·rstd − μ·rstd (one FMA; μ, rstd saved by the forward) and g = dy ∘ w:

            c1 = mean(g ∘ x̂),  c2 = mean(g)      two reductions over the row
            dx = rstd · (g − c2 − x̂ · c1)        = rstd·g − (x̂·(c1·rstd) + c2·rstd): two FMAs
            dw_part += dy ∘ x̂,  db_part += dy     fp32

        Tiles of up to ONE_PASS_TILE elements take one pass: x and dy are read once and stay
        in registers across the reductions, w is read once before the loop, and the partials
        are register accumulators written once at the end. Wider rows (BLOCK_N >
        ONE_PASS_TILE) would not fit the register file: `_ln_bwd_chunked` walks them in
        CHUNK-wide pieces."""
        if ROWS * BLOCK_N > _ONE_PASS_TILE:
            _ln_bwd_chunked(X, W, MEAN, RSTD, DY, DH, DX, DW_PART, DB_PART, M, N, HAS_DH, HAS_BIAS)
        else:
            _ln_bwd_one_pass(X, W, MEAN, RSTD, DY, DH, DX, DW_PART, DB_PART, M, N, HAS_DH, HAS_BIAS, ROWS, BLOCK_N)

    @triton.jit
    def _ln_bwd_one_pass(X, W, MEAN, RSTD, DY, DH, DX, DW_PART, DB_PART, M, N, HAS_DH: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        local = tl.arange(0, ROWS)[:, None] * N + cols[None, :]  # (ROWS, BLOCK_N) offsets within a tile
        inv_n = 1.0 / N  # once, not a division per tile
        dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # lives in registers for the whole loop
        db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        if not HAS_DH:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_N), once

        for tile in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            start = tl.cast(tile * ROWS, tl.int64) * N  # the tile's first element: M·N may pass 2**31
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]               # (ROWS, 1)
            mean_rstd = tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None] * rstd
            x = tl.load(X + start + local, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + local, mask=mask, other=0.0).to(tl.float32)
            if HAS_DH:  # w read per tile (from the caches): its registers go to dh's, no spills
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            # padding: x̂ = −μ·rstd there, but dy = w = 0, so g = 0 and nothing reaches c1, c2, dw, db
            xhat = x * rstd - mean_rstd
            g = dy * w
            dw_acc += dy * xhat   # before the reductions: dy is then dead, fewer values live across them
            if HAS_BIAS:
                db_acc += dy
            c1 = tl.sum(g * xhat, axis=1)[:, None] * inv_n                            # (ROWS, 1)
            c2 = tl.sum(g, axis=1)[:, None] * inv_n
            dx = g * rstd - (xhat * (c1 * rstd) + c2 * rstd)
            if HAS_DH:  # residual variant: the gradient reaching h from outside joins here
                dx += tl.load(DH + start + local, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + start + local, dx.to(DX.dtype.element_ty), mask=mask)

        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if HAS_BIAS:
            tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)

    @triton.jit
    def _ln_bwd_chunked(X, W, MEAN, RSTD, DY, DH, DX, DW_PART, DB_PART, M, N, HAS_DH: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
        """Rows wider than ONE_PASS_TILE, one row at a time in CHUNK-wide pieces: a first walk
        sums g ∘ x̂ and g, a second reads x, dy, w again (from the L1/L2 caches: the row was
        just read) for dx, and adds dy ∘ x̂ (and dy) to the program's rows of DW_PART (DB_PART)
        in memory (written on the program's first row, read and written after; they stay in
        the caches)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, _CHUNK)
        inv_n = 1.0 / N
        dw_row = DW_PART + pid * N
        db_row = DB_PART + pid * N
        for row in range(pid, M, tl.num_programs(0)):
            start = tl.cast(row, tl.int64) * N  # M·N may pass 2**31
            rstd = tl.load(RSTD + row)
            mean_rstd = tl.load(MEAN + row) * rstd
            acc_gx = tl.zeros((_CHUNK,), dtype=tl.float32)
            acc_g = tl.zeros((_CHUNK,), dtype=tl.float32)
            for c0 in range(0, N, _CHUNK):
                ok = c0 + cols < N
                x = tl.load(X + start + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                dy = tl.load(DY + start + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                g = dy * tl.load(W + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                acc_gx += g * (x * rstd - mean_rstd)
                acc_g += g
            c1_rstd = tl.sum(acc_gx, axis=0) * inv_n * rstd
            c2_rstd = tl.sum(acc_g, axis=0) * inv_n * rstd
            for c0 in range(0, N, _CHUNK):
                ok = c0 + cols < N
                x = tl.load(X + start + c0 + cols, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                dy = tl.load(DY + start + c0 + cols, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                g = dy * tl.load(W + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                xhat = x * rstd - mean_rstd
                dx = g * rstd - (xhat * c1_rstd + c2_rstd)
                if HAS_DH:
                    dx += tl.load(DH + start + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(DX + start + c0 + cols, dx.to(DX.dtype.element_ty), mask=ok)
                later = tl.full((_CHUNK,), row, tl.int32) > pid  # false on the first row: partials start at 0
                dw = tl.load(dw_row + c0 + cols, mask=ok & later, other=0.0)
                tl.store(dw_row + c0 + cols, dw + dy * xhat, mask=ok)
                if HAS_BIAS:
                    db = tl.load(db_row + c0 + cols, mask=ok & later, other=0.0)
                    tl.store(db_row + c0 + cols, db + dy, mask=ok)
            tl.debug_barrier()  # the next row's reads of the partial rows see this row's writes


POISON_OUTPUTS = False             # NaN-filled outputs (tests, the GPU check): see ltk/kernels/poison.py
_empty = output_allocator(__name__)


# ---------------------------------------------------------------------------------------
# 3. Plain-PyTorch references (the ground truth of the tests; any dtype)
# ---------------------------------------------------------------------------------------
def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         eps: float = 1e-5) -> torch.Tensor:
    """The forward equations above, one PyTorch op each, in x's dtype."""
    mean = x.mean(dim=-1, keepdim=True)                      # (..., 1)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)       # (..., 1), biased as in the paper
    y = (x - mean) * torch.rsqrt(var + eps) * weight
    return y if bias is None else y + bias


def layer_norm_residual_reference(x, residual, weight, bias, eps: float = 1e-5):
    """(y, h) with h = x + residual and y = LayerNorm(h)."""
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h


# ---------------------------------------------------------------------------------------
# 4. Autograd function and public API
# ---------------------------------------------------------------------------------------
def _layer_norm_fwd(x, residual, weight, bias, eps):
    """Launch the forward on (M, N) contiguous tensors; returns y, h (or None), mean, rstd."""
    m, n = x.shape
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)  # h's and y's
    y = _empty((m, n), dtype, x.device)
    h = _empty((m, n), dtype, x.device) if residual is not None else None
    mean = _empty((m,), torch.float32, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m > 0:
        block_n, rows, num_warps = launch_config(m, n)
        _layer_norm_fwd_kernel[(triton.cdiv(m, rows),)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            y, h if h is not None else y, mean, rstd, m, n, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y, h, mean, rstd


def _layer_norm_bwd(x, weight, bias, mean, rstd, dy, dh):
    """Launch the backward; returns dx (with dh added when given), dw, db (or None)."""
    m, n = x.shape
    dx = _empty((m, n), x.dtype, x.device)
    block_n, rows, num_warps = launch_config(m, n, backward=True)
    programs = bwd_programs(m, n, x.device) if m > 0 else 0
    dw_part = _empty((programs, n), torch.float32, x.device)
    db_part = _empty((programs, n), torch.float32, x.device) if bias is not None else None
    if m > 0:
        _layer_norm_bwd_kernel[(programs,)](
            x, weight, mean, rstd, dy, dh if dh is not None else dy, dx,
            dw_part, db_part if db_part is not None else dw_part, m, n,
            HAS_DH=dh is not None, HAS_BIAS=bias is not None,
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    dw = dw_part.sum(0).to(weight.dtype)  # (programs, N) -> (N,), deterministic
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x) — or, given a residual, (y, h) = (LayerNorm(h), h) with h = x + residual —
    for x of shape (..., N), with the Triton kernels above. The kernels see (M, N) rows."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        shape, x2 = x.shape, as_rows(x)                         # (M, N)
        weight = weight.contiguous()                             # the kernels index it as w[col]
        bias = bias.contiguous() if bias is not None else None
        with on_device(x):
            y, h, mean, rstd = _layer_norm_fwd(x2, as_rows(residual), weight, bias, eps)
        ctx.shape, ctx.has_residual = shape, residual is not None
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.set_materialize_grads(False)
        # the backward needs the normalized input: x itself, or h for the residual variant
        ctx.save_for_backward(h if ctx.has_residual else x2, weight, bias, mean, rstd)
        return (y.view(shape), h.view(shape)) if ctx.has_residual else y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        xin, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only h was used: nothing flows through the norm
            dx = dh
            dw = torch.zeros_like(weight)
            db = torch.zeros_like(bias) if bias is not None else None
        else:
            with on_device(xin):
                dx, dw, db = _layer_norm_bwd(xin, weight, bias, mean, rstd, as_rows(dy), as_rows(dh))
            dx = dx.view(ctx.shape)
        # h = x + residual: x and residual receive the same gradient, as from torch's own add
        # (the very same tensor; autograd copies it where a leaf would otherwise alias the other)
        if not ctx.has_residual:
            return dx, None, dw, db, None
        return as_dtype(dx, ctx.dtypes[0]), as_dtype(dx, ctx.dtypes[1]), dw, db, None


def _torch_layer_norm(h, weight, bias, eps):
    if weight.dtype != h.dtype:  # fp32 weights with fp16/bf16 activations
        weight = weight.to(h.dtype)
        bias = bias.to(h.dtype) if bias is not None else None
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dim of x (..., N) with weight (N,) and bias (N,) or None.
    Returns a tensor of x's shape and dtype. See the module docstring for the math."""
    backend = check_norm_inputs(x, None, weight, bias, eps, backend)
    if backend == "torch":
        return _torch_layer_norm(x, weight, bias, eps)
    return LayerNormFunction.apply(x, None, weight, bias, float(eps))


def layer_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, eps: float = 1e-5,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) with h = x + residual (the new residual stream) and y = LayerNorm(h).
    Gradients from both y and h flow back to x and residual. h and y take the dtype of
    x + residual (torch's type promotion: bf16 + fp32 -> fp32)."""
    backend = check_norm_inputs(x, residual, weight, bias, eps, backend)
    if backend == "torch":
        h = x + residual
        return _torch_layer_norm(h, weight, bias, eps), h
    return LayerNormFunction.apply(x, residual, weight, bias, float(eps))


# ---------------------------------------------------------------------------------------
# 5. Cost model
# ---------------------------------------------------------------------------------------
def flops(rows: int, cols: int, *, mode: str = "fwd", residual: bool = False) -> int:
    """Floating-point operations, counted per element (the per-row sqrt/divide are negligible):
    forward 7 (sum for μ; subtract; square and sum for σ²; times rstd; times w; plus b),
    backward 13 (recompute x̂: 2; g = dy·w: 1; Σg and Σg·x̂: 3; dx: 4; dw and db: 3);
    the residual adds 1 each way (x + residual; dh + dx)."""
    check_mode(mode)
    per = {"fwd": 7, "bwd": 13, "fwd+bwd": 20}[mode]
    if residual:
        per += {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]
    return per * rows * cols


def bytes_moved(rows: int, cols: int, *, dtype_bytes: int = 2, mode: str = "fwd",
                residual: bool = False) -> int:
    """The minimum HBM traffic of the fused kernels, in bytes (weights and bias in the
    activations' dtype; statistics mean and rstd in fp32, 8 bytes a row):

    forward   read x (+ residual), w, b; write y (+ h), mean, rstd
    backward  read x (h for the residual variant), dy (+ dh), w, mean, rstd; write dx, dw, db
    (the dw/db partial buffer is implementation overhead, not counted)."""
    check_mode(mode)
    act = rows * cols * dtype_bytes       # one activation tensor
    vec = cols * dtype_bytes              # one (N,) parameter vector
    stats = rows * 8
    fwd = (2 + 2 * residual) * act + 2 * vec + stats
    bwd = (3 + residual) * act + 3 * vec + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
