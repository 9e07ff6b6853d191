"""Triton kernels for the fused LoRA linear (ltk/kernels/lora.py holds the math, the reference,
the autograd function and the API).

Two kernels serve forward and backward alike:

  * `_skinny_kernel`: OUT (M, R) = X (M, L) · Pᵀ, P an (R, L) matrix given by strides, R
    small (the LoRA rank). fp32 output. Forward: u = x · Aᵀ (P = A). Backward: g = dy · B
    (P = Bᵀ, the (N, r) B read with swapped strides, no copy). A program owns BLOCK_M rows
    and walks L; the (BLOCK_M, BLOCK_R) accumulator is tiny.
  * `_gemm_lowrank_kernel`: C (M, O) = X (M, L) · Pᵀ + s · V (M, R) · Qᵀ (+ bias), with P
    (O, L) and Q (O, R) given by strides. A program owns a (BLOCK_M, BLOCK_O) tile of C: it
    walks L for the main GEMM, then in the epilogue loads the (BLOCK_M, BLOCK_R) tile of V
    and the (BLOCK_O, BLOCK_R) tile of Q once and adds s · V·Qᵀ to the fp32 accumulator,
    then the bias, and stores C once.
      forward   y  = x · Wᵀ + s · u · Bᵀ + b     P = W (N, K),            Q = B (N, r)
      backward  dx = dy · W + s · g · A          P = Wᵀ (K, N) by strides, Q = Aᵀ (K, r) by strides

R is padded to BLOCK_R = a power of two ≥ 16 (tl.dot's minimum); the padding is masked to
zero on load, so it adds nothing.

Arithmetic: the main GEMM runs in the input dtype with fp32 accumulation (IEEE fp32 dots for
fp32 inputs, not TF32). u and g are kept in fp32 (M·r·4 bytes: negligible) so the low-rank
term loses nothing to an intermediate rounding; the epilogue dot is fp32 (IEEE for fp32
inputs, TF32 for fp16/bf16 inputs, whose outputs are coarser than TF32 anyway). Under the
interpreter every dot runs on fp32 values (bf16 arithmetic is wrong there). Output cast on
store.
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import HAS_TRITON, interpreter_on, output_buffer

# Fill every output with NaN before launch (tests), so an element a kernel forgets to write
# fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False
_GPU_TILES = (64, 64, 64)          # (BLOCK_M, BLOCK_O, BLOCK_L) on a GPU (not tuned)
_INTERPRETER_TILES = (16, 32, 32)  # small tiles: the interpreter's cost grows with tile size
_GPU_SKINNY_BLOCK_M = 32           # more programs for the thin u / g products
MAX_RANK = 128                     # the epilogue holds (BLOCK_M, BLOCK_R) + (BLOCK_O, BLOCK_R) tiles


def _empty(shape, dtype, device) -> torch.Tensor:
    return output_buffer(shape, dtype, device, POISON_OUTPUTS)  # read at call time: tests flip the flag


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(X, P, OUT, M, L, R, stride_pr, stride_pl,
                       BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """OUT[m, j] = Σ_l X[m, l] · P[j, l] for this program's BLOCK_M rows, fp32."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        rr = tl.arange(0, BLOCK_R)                                  # (BLOCK_R,)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)                         # (BLOCK_L,)
            x = tl.load(X + rm.to(tl.int64)[:, None] * L + rl[None, :],
                        mask=(rm[:, None] < M) & (rl[None, :] < L), other=0.0)
            p = tl.load(P + rr.to(tl.int64)[:, None] * stride_pr + rl[None, :].to(tl.int64) * stride_pl,
                        mask=(rr[:, None] < R) & (rl[None, :] < L), other=0.0)  # (BLOCK_R, BLOCK_L)
            if FP32_DOTS:
                x = x.to(tl.float32)
                p = p.to(tl.float32)
            acc = tl.dot(x, tl.trans(p), acc, input_precision=DOT_PRECISION)
        tl.store(OUT + rm.to(tl.int64)[:, None] * R + rr[None, :], acc,
                 mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _gemm_lowrank_kernel(X, P, V, Q, BIAS, C, M, O, L, R, scale,
                             stride_po, stride_pl, stride_qo, stride_qr,
                             HAS_BIAS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_R: tl.constexpr, FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             EPI_PRECISION: tl.constexpr):
        """C[m, o] = Σ_l X[m, l] · P[o, l] + scale · Σ_j V[m, j] · Q[o, j] (+ BIAS[o])."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)     # (BLOCK_O,)
        m_ok, o_ok = rm < M, ro < O
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):                             # the main GEMM
            rl = l0 + tl.arange(0, BLOCK_L)                         # (BLOCK_L,)
            x = tl.load(X + rm.to(tl.int64)[:, None] * L + rl[None, :],
                        mask=m_ok[:, None] & (rl[None, :] < L), other=0.0)
            p = tl.load(P + ro.to(tl.int64)[:, None] * stride_po + rl[None, :].to(tl.int64) * stride_pl,
                        mask=o_ok[:, None] & (rl[None, :] < L), other=0.0)  # (BLOCK_O, BLOCK_L)
            if FP32_DOTS:
                x = x.to(tl.float32)
                p = p.to(tl.float32)
            acc = tl.dot(x, tl.trans(p), acc, input_precision=DOT_PRECISION)
        # epilogue: the low-rank term, one (BLOCK_M, BLOCK_R) · (BLOCK_R, BLOCK_O) dot
        rr = tl.arange(0, BLOCK_R)                                  # (BLOCK_R,)
        v = tl.load(V + rm.to(tl.int64)[:, None] * R + rr[None, :],
                    mask=m_ok[:, None] & (rr[None, :] < R), other=0.0)           # fp32
        q = tl.load(Q + ro.to(tl.int64)[:, None] * stride_qo + rr[None, :].to(tl.int64) * stride_qr,
                    mask=o_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)  # (BLOCK_O, BLOCK_R)
        low = tl.dot(v, tl.trans(q), input_precision=EPI_PRECISION)
        acc += scale * low
        if HAS_BIAS:
            acc += tl.load(BIAS + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(C + rm.to(tl.int64)[:, None] * O + ro[None, :], acc.to(C.dtype.element_ty),
                 mask=m_ok[:, None] & o_ok[None, :])


def _tiles() -> tuple[int, int, int]:
    return _INTERPRETER_TILES if interpreter_on() else _GPU_TILES


def block_r(r: int) -> int:
    """The rank padded to a power of two ≥ 16 (tl.dot's smallest dimension)."""
    return max(16, 1 << max(0, (r - 1).bit_length()))


def _dot_args(dtype: torch.dtype) -> dict:
    return dict(FP32_DOTS=interpreter_on(), DOT_PRECISION="ieee" if dtype == torch.float32 else None)


def skinny_triton(x2: torch.Tensor, p: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """fp32 (M, r) = x2 (M, L) · pᵀ for p (r, L); with transpose=True p is (L, r) and the
    product is x2 · p (read by strides, no copy). x2 and p contiguous."""
    m, l_ = x2.shape
    r = p.shape[1] if transpose else p.shape[0]
    stride_pr, stride_pl = (1, r) if transpose else (l_, 1)
    out = _empty((m, r), torch.float32, x2.device)
    if m:
        bm = _INTERPRETER_TILES[0] if interpreter_on() else _GPU_SKINNY_BLOCK_M
        bl = _tiles()[2]
        _skinny_kernel[(triton.cdiv(m, bm),)](
            x2, p, out, m, l_, r, stride_pr, stride_pl,
            BLOCK_M=bm, BLOCK_L=bl, BLOCK_R=block_r(r), **_dot_args(x2.dtype))
    return out


def lora_fwd_triton(x2, weight, bias, u, lora_B, scale: float) -> torch.Tensor:
    """y (M, N) = x2 · Wᵀ + scale · u · Bᵀ (+ bias); u fp32 (M, r); all contiguous."""
    m, k = x2.shape
    n, r = lora_B.shape
    y = _empty((m, n), x2.dtype, x2.device)
    if m and n:
        bm, bo, bl = _tiles()
        _gemm_lowrank_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bo))](
            x2, weight, u, lora_B, bias if bias is not None else weight, y, m, n, k, r, float(scale),
            k, 1, r, 1, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_O=bo, BLOCK_L=bl, BLOCK_R=block_r(r), **_dot_args(x2.dtype),
            EPI_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")
    return y


def lora_dx_triton(dy2, weight, g, lora_A, scale: float) -> torch.Tensor:
    """dx (M, K) = dy2 · W + scale · g · A; g fp32 (M, r); all contiguous."""
    m, n = dy2.shape
    r, k = lora_A.shape
    dx = _empty((m, k), dy2.dtype, dy2.device)
    if m and k:
        bm, bo, bl = _tiles()
        _gemm_lowrank_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bo))](
            dy2, weight, g, lora_A, weight, dx, m, k, n, r, float(scale),
            1, k, 1, k, HAS_BIAS=False,                 # Wᵀ (K, N) and Aᵀ (K, r) by strides
            BLOCK_M=bm, BLOCK_O=bo, BLOCK_L=bl, BLOCK_R=block_r(r), **_dot_args(dy2.dtype),
            EPI_PRECISION="ieee" if dy2.dtype == torch.float32 else "tf32")
    return dx
