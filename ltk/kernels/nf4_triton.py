"""Triton kernels for NF4 weights (ltk/kernels/nf4.py holds the format, the references and the API).

Storage (ltk/kernels/nf4.py): a weight W of shape (N, K) is read as a flat vector w of N·K
elements, w[i] = W[i // K, i % K]. Element i is the 4-bit code in byte i // 2 of `packed`
(the high nibble for even i, the low one for odd i) and its block is i // blocksize:

    W[n, k] = CODE[nibble(n·K + k)] · absmax[(n·K + k) // blocksize]      (fp32 product)

Because the kernels index the flat vector, K need not be a multiple of blocksize or of 2
(a block or a byte may straddle two rows of W).

Kernels:
  * `_dequant_kernel`: packed + absmax -> W in fp16/bf16/fp32 (one program, BLOCK elements).
  * `_matmul_fwd_kernel`: y = x · Wᵀ, (M, K) · (K, N). A program owns a (BLOCK_M, BLOCK_N)
    tile of y and walks K in steps of BLOCK_K; at each step it dequantizes the
    (BLOCK_N, BLOCK_K) tile of W in registers from 0.5 byte a weight + one absmax a block,
    and never writes W to memory.
  * `_matmul_bwd_kernel`: dx = dy · W, (M, N) · (N, K). A program owns a (BLOCK_M, BLOCK_K)
    tile of dx and walks N, dequantizing (BLOCK_N, BLOCK_K) tiles of W the same way. W is
    frozen (QLoRA: only adapters train), so there is no dW kernel.

Arithmetic: the dequantized value is formed in fp32 (code · absmax, exactly as the
reference), then rounded to x's dtype for the dot (tensor cores on a GPU; fp32 inputs use
IEEE fp32 dots, not TF32). Under the interpreter the same rounding is applied and the dot
then runs in fp32 (bf16 arithmetic is not right in the interpreter). Accumulation is fp32;
the output is cast on store.
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import HAS_TRITON, interpreter_on, output_buffer

# Fill every output with NaN before launch (tests), so an element a kernel forgets to write
# fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False
_DEQUANT_BLOCK = 1024
_GPU_TILES = (64, 64, 64)          # (BLOCK_M, BLOCK_N, BLOCK_K) on a GPU (not tuned)
_INTERPRETER_TILES = (16, 32, 32)  # small tiles: the interpreter's cost grows with tile size


def _empty(shape, dtype, device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)  # read at call time: tests flip the flag


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequant_tile(PACKED, ABSMAX, CODE, flat, mask, blocksize):
        """fp32 weights at flat indices `flat` (any shape): CODE[nibble] · absmax[block]."""
        byte = tl.load(PACKED + flat // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where(flat % 2 == 0, byte >> 4, byte & 15)          # first element: high nibble
        code = tl.load(CODE + nib, mask=mask, other=0.0)             # 16 floats, cache-resident
        scale = tl.load(ABSMAX + flat // blocksize, mask=mask, other=0.0)
        return code * scale

    @triton.jit
    def _dequant_kernel(PACKED, ABSMAX, CODE, OUT, numel, blocksize, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = _dequant_tile(PACKED, ABSMAX, CODE, offs, mask, blocksize)
        tl.store(OUT + offs, w.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _matmul_fwd_kernel(X, PACKED, ABSMAX, CODE, Y, M, N, K, blocksize,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Y[m, n] = Σ_k X[m, k] · W[n, k] for this program's (BLOCK_M, BLOCK_N) tile."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)     # (BLOCK_N,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)                         # (BLOCK_K,)
            x_mask = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(X + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=x_mask, other=0.0)
            w_mask = (rn[:, None] < N) & (rk[None, :] < K)
            flat = rn.to(tl.int64)[:, None] * K + rk[None, :]       # (BLOCK_N, BLOCK_K)
            w = _dequant_tile(PACKED, ABSMAX, CODE, flat, w_mask, blocksize).to(X.dtype.element_ty)
            if FP32_DOTS:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        y_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(Y + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _matmul_bwd_kernel(DY, PACKED, ABSMAX, CODE, DX, M, N, K, blocksize,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """DX[m, k] = Σ_n DY[m, n] · W[n, k] for this program's (BLOCK_M, BLOCK_K) tile."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)     # (BLOCK_K,)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)                         # (BLOCK_N,)
            dy_mask = (rm[:, None] < M) & (rn[None, :] < N)
            dy = tl.load(DY + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=dy_mask, other=0.0)
            w_mask = (rn[:, None] < N) & (rk[None, :] < K)
            flat = rn.to(tl.int64)[:, None] * K + rk[None, :]       # (BLOCK_N, BLOCK_K)
            w = _dequant_tile(PACKED, ABSMAX, CODE, flat, w_mask, blocksize).to(DY.dtype.element_ty)
            if FP32_DOTS:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        dx_mask = (rm[:, None] < M) & (rk[None, :] < K)
        tl.store(DX + rm.to(tl.int64)[:, None] * K + rk[None, :], acc.to(DX.dtype.element_ty), mask=dx_mask)


def _tiles() -> tuple[int, int, int]:
    return _INTERPRETER_TILES if interpreter_on() else _GPU_TILES


def _dot_args(dtype: torch.dtype) -> dict:
    return dict(FP32_DOTS=interpreter_on(), DOT_PRECISION="ieee" if dtype == torch.float32 else None)


def dequantize_triton(packed, absmax, code, numel: int, blocksize: int, dtype) -> torch.Tensor:
    """The flat (numel,) dequantized weight in `dtype`."""
    out = _empty((numel,), dtype, packed.device)
    if numel:
        _dequant_kernel[(triton.cdiv(numel, _DEQUANT_BLOCK),)](
            packed, absmax, code, out, numel, blocksize, BLOCK=_DEQUANT_BLOCK)
    return out


def matmul_fwd_triton(x2, packed, absmax, code, n: int, blocksize: int) -> torch.Tensor:
    """y (M, N) = x2 (M, K) · Wᵀ, x2 contiguous."""
    m, k = x2.shape
    y = _empty((m, n), x2.dtype, x2.device)
    if m and n:
        bm, bn, bk = _tiles()
        _matmul_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, packed, absmax, code, y, m, n, k, blocksize,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_dot_args(x2.dtype))
    return y


def matmul_bwd_triton(dy2, packed, absmax, code, k: int, blocksize: int) -> torch.Tensor:
    """dx (M, K) = dy2 (M, N) · W, dy2 contiguous."""
    m, n = dy2.shape
    dx = _empty((m, k), dy2.dtype, dy2.device)
    if m and k:
        bm, bn, bk = _tiles()
        _matmul_bwd_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
            dy2, packed, absmax, code, dx, m, n, k, blocksize,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_dot_args(dy2.dtype))
    return dx
