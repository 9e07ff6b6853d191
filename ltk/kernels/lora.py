"""Fused LoRA linear (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685, §4.1, eq. 3: h = W₀x + ΔWx = W₀x + BAx, scaled by s = α/r):

    y = x · Wᵀ + b + s · (x · Aᵀ) · Bᵀ        x (M, K), W (N, K) frozen, b (N,) frozen or none,
                                               A (r, K), B (N, r), s a scalar, r ≪ K, N

Backward (W frozen: no dW unless it asks for one), with u = x · Aᵀ (M, r) saved from the
forward and g = dy · B (M, r):

    dx = dy · W + s · g · A          (M, K)
    dA = s · gᵀ · x                  (r, K)
    dB = s · dyᵀ · u                 (N, r)    reuses u: x · Aᵀ is never recomputed
    db = Σ_rows dy                   (N,)      only if the bias requires grad

What the triton backend runs (ltk/kernels/lora_triton.py):
  forward   u = x · Aᵀ by a small Triton kernel (fp32 out, saved for backward); then y by
            one of two routes (below): ONE Triton kernel that computes each tile of x · Wᵀ and
            adds s · u_tile · B_tileᵀ and the bias in its epilogue before its single store of
            y ("fused"), or cuBLAS: t = s·u·Bᵀ (+ b) written, then y = t + x · Wᵀ by a GEMM
            that reads t in its epilogue (beta = 1, in place) ("cublas").
  backward  g = dy · B by the same small kernel (fp32); then dx = dy · W + s · g · A by the
            same two routes; dA = s · gᵀx and dB = s · dyᵀu are torch matmuls (r-sized
            outputs), with g and u rounded to the input dtype for them.

Which route: the cost model `fused_is_faster`. Both do the same FLOPs; they differ in
  * tiles: the GEMM's speed is set by its tile, 2·BM·BN / ((BM + BN)·d) FLOP per operand
    byte of a k-step: the fused kernel autotunes over 128×256 and 256×128 tiles (85 FLOP/B
    in bf16, what cuBLAS runs at large sizes) down to 64×128 (43), with grouped tile order so
    that CTAs resident together share weight tiles in L2. cuBLAS still has the edge in
    scheduling (TMA, warp specialization, split-K for small grids): assumed 10% (TC_EFFICIENCY;
    the GPU check measures it), and a grid of fewer 128×256 tiles than SMs leaves SMs idle;
  * bytes of the low-rank term: the cublas route writes t (M·O·d) and the GEMM reads it back,
    2·M·O·d more than fused. Against a compute-bound GEMM that is d·F / (BW·L) of its time:
    590 / L on an H100 in bf16 (F/BW = 295 FLOP/B), 14% at L = 4096, 5% at L = 11008.
So the fused kernel wins where the saved bytes outweigh cuBLAS's edge: on an H100 in bf16,
compute-bound shapes with a full grid and L < 5,300 (x·Wᵀ of Llama-7B's q/k/v/o and up
projections at 2,048+ tokens), and cuBLAS wins for deep reductions (the down projection, L =
11,008), for small M (a grid under one wave; the memory-bound GEMM streams W, and t's 2·M·O·d
are ≤ 2M/L of that) and for fp32 (IEEE dots run on the FMA units, where cuBLAS's SGEMM is far
ahead of Triton's). Under the interpreter the fused kernel always runs: checking it is the
interpreter's job. `ROUTE` forces one.

"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.kernels import lora_triton
from ltk.kernels.backend import check_float, check_same_device, resolve_backend
from ltk.training.hardware import Peak, peak_for

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)
_MODES = ("fwd", "bwd", "fwd+bwd")
H100_SXM = Peak("NVIDIA H100 SXM", 989.4, 3350.0)   # the cost model's default machine
TC_EFFICIENCY = 0.9    # our tensor-core tiles against cuBLAS (assumed: calibrate with the GPU check)
FMA_EFFICIENCY = 0.5   # Triton's IEEE fp32 dot (FMA units) against cuBLAS's SGEMM (assumed)
FP32_RATE = 1 / 15     # fp32 FMA rate / bf16 tensor-core rate (H100 SXM datasheet: 67 vs 989 TFLOP/s)


# ---------------------------------------------------------------------------------------
# Reference (the ground truth of the tests; any float dtype, float64 included)
# ---------------------------------------------------------------------------------------
def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale: float) -> torch.Tensor:
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, one PyTorch op each, in the inputs' dtype."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_A), lora_B)


# ---------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------
def _check_inputs(x, weight, bias, lora_A, lora_B, scale, backend: str) -> str:
    check_float("x", x, _TORCH_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (..., K); got a 0-d tensor")
    backend = resolve_backend(backend, x)
    allowed = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    check_float("x", x, allowed)
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is None and name == "bias":
            continue
        check_float(name, t, allowed)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, x has {x.dtype}: they must match")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be (N, K) with K = x's last dim {k}; got {tuple(weight.shape)}")
    n = weight.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must be (r, K) with K = {k} and r ≥ 1; got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.shape != (n, r):
        raise ValueError(f"lora_B must be (N, r) = ({n}, {r}) to match weight and lora_A; got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},) to match weight's N; got {tuple(bias.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if backend == "triton" and r > lora_triton.MAX_RANK:
        raise ValueError(f"rank r = {r} exceeds the triton backend's {lora_triton.MAX_RANK} (use backend='torch')")
    if backend == "triton" and k == 0:
        raise ValueError("x's last dim K is 0: nothing to multiply")
    return backend


# ---------------------------------------------------------------------------------------
# Autograd function and public API
# ---------------------------------------------------------------------------------------
# Which GEMM serves a product: "auto" (the cost model `fused_is_faster` on a GPU; always the
# fused kernel under the interpreter, whose job is to check it), "fused" or "cublas" (forced:
# tests, benchmarks).
ROUTE = "auto"


def _route(m: int, o: int, l_: int, x: torch.Tensor) -> str:
    """The route of the (M, O) = (M, L) · (L, O) product plus its low-rank term."""
    if ROUTE not in ("auto", "fused", "cublas"):
        raise ValueError(f"lora.ROUTE must be 'auto', 'fused' or 'cublas', got {ROUTE!r}")
    if ROUTE != "auto":
        return ROUTE
    if not x.is_cuda:
        return "fused"
    peak = peak_for(torch.cuda.get_device_name(x.device)) or H100_SXM
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    fast = fused_is_faster(m, o, l_, dtype_bytes=x.element_size(), fp32=x.dtype == torch.float32, peak=peak, sms=sms)
    return "fused" if fast else "cublas"


def _gemm_then_add(x2, pt, v, qt, bias, scale: float) -> torch.Tensor:
    """x2 (M, L) · pt (L, O) + scale · v · qt (+ bias) by cuBLAS: the low-rank term t (M, O)
    first (v fp32 (M, r) scaled, then rounded to the dtype), then t += x2 · pt in place,
    added in cuBLAS's epilogue (beta = 1)."""
    vs = (v * scale).to(x2.dtype)                             # (M, r)
    t = torch.mm(vs, qt) if bias is None else torch.addmm(bias, vs, qt)  # (M, O)
    return t.addmm_(x2, pt)


class LoRALinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with the Triton kernels; x (..., K) is seen as (M, K) rows.
    Saves x, W, A, B and u = x·Aᵀ (fp32, (M, r)) for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        shape, k = x.shape, x.shape[-1]
        x2 = x.reshape(-1, k).contiguous()                      # (M, K)
        weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
        bias = bias.contiguous() if bias is not None else None
        u = lora_triton.skinny_triton(x2, lora_A)                # (M, r) fp32 = x·Aᵀ
        if _route(x2.shape[0], weight.shape[0], k, x2) == "fused":
            y = lora_triton.lora_fwd_triton(x2, weight, bias, u, lora_B, scale)  # (M, N)
        else:
            y = _gemm_then_add(x2, weight.t(), u, lora_B.t(), bias, scale)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, u)
        ctx.scale, ctx.x_shape, ctx.has_bias = scale, shape, bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, u = ctx.saved_tensors
        s, n = ctx.scale, weight.shape[0]
        dy2 = dy.reshape(-1, n).contiguous()                    # (M, N)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = db = da = dbb = None
        g = lora_triton.skinny_triton(dy2, lora_B, transpose=True) if (need_x or need_a) else None  # (M, r) fp32
        if need_x:
            if _route(dy2.shape[0], weight.shape[1], n, dy2) == "fused":
                dx = lora_triton.lora_dx_triton(dy2, weight, g, lora_A, s)
            else:
                dx = _gemm_then_add(dy2, weight, g, lora_A, None, s)
            dx = dx.view(ctx.x_shape)
        if need_a:
            da = s * (g.to(x2.dtype).t() @ x2)                  # (r, M)·(M, K) -> (r, K)
        if need_bb:
            dbb = s * (dy2.t() @ u.to(dy2.dtype))               # (N, M)·(M, r) -> (N, r), u reused
        if need_w:  # W is frozen in LoRA; served (unfused) for completeness
            dw = dy2.t() @ x2                                   # (N, K)
        if need_b and ctx.has_bias:
            db = dy2.sum(0)                                     # (N,)
        return dx, dw, db, da, dbb, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ for x (..., K), W (N, K), b (N,) or None, A (r, K),
    B (N, r), all of x's dtype; y (..., N). backend: "torch" (the reference ops), "triton"
    (the fused kernels), "auto" (triton on CUDA). Gradients reach every input that requires
    them (dW and db unfused: in LoRA they are frozen)."""
    if _check_inputs(x, weight, bias, lora_A, lora_B, scale, backend) == "torch":
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scale)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale))


# ---------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------
def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def flops(M: int, N: int, K: int, r: int, *, mode: str = "fwd") -> int:
    """Matmul FLOPs (2 a multiply-add), the same fused or not:
    fwd  2MNK (x·Wᵀ) + 2MKr (u) + 2MNr (u·Bᵀ)
    bwd  2MNK (dy·W) + 2MNr (g) + 2MrK (g·A) + 2MrK (dA) + 2MNr (dB)   (no dW: W is frozen)"""
    _check_mode(mode)
    fwd = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    bwd = 2 * M * N * K + 4 * M * N * r + 4 * M * r * K
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bytes_moved(M: int, N: int, K: int, r: int, *, dtype_bytes: int = 2, bias: bool = True,
                fused: bool = True, mode: str = "fwd") -> int:
    """HBM traffic in bytes, each kernel reading its inputs and writing its outputs once
    (d = dtype_bytes; u and g are fp32 in the fused path, in the dtype unfused).

    fwd fused    u kernel: x, A, write u (4·M·r); main kernel: x, W, u, B, b, write y
    fwd unfused  u = x·Aᵀ: x, A, write u; t = s·u·Bᵀ: u, B, write t (M·N);
                 y₀ = x·Wᵀ + b: x, W, b, write y₀; y = y₀ + t: read y₀, t, write y
                 (4·M·N·d more than fused)
    bwd fused    g kernel: dy, B, write g (4·M·r); dx kernel: dy, W, g, A, write dx;
                 dA: g, x, write dA; dB: dy, u, write dB
    bwd unfused  the same, but dy·W and dx's LoRA term (each M·K) are written, read back
                 and their sum written: 4·M·K·d more, and g, u move in the dtype."""
    _check_mode(mode)
    d = dtype_bytes
    ur = 4 if fused else d                                     # bytes an element of u, g
    x_, w_, a_, b_, bias_ = M * K * d, N * K * d, r * K * d, N * r * d, (N * d if bias else 0)
    y_, dx_ = M * N * d, M * K * d
    u_ = M * r * ur
    fwd = (x_ + a_ + u_) + (x_ + w_ + u_ + b_ + bias_ + y_)
    if not fused:
        fwd += 4 * y_                                          # y₀ and t written, read, y written
    bwd = (y_ + b_ + u_) + (y_ + w_ + u_ + a_ + dx_) + (u_ + x_ + a_) + (y_ + u_ + b_)
    if not fused:
        bwd += 4 * dx_
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def fused_is_faster(M: int, O: int, L: int, *, dtype_bytes: int = 2, fp32: bool = False, peak: Peak = H100_SXM,
                    sms: int = 132, efficiency: float | None = None) -> bool:
    """Whether the fused kernel beats cuBLAS + an added low-rank term for C (M, O) = X (M, L) ·
    Pᵀ + s·V·Qᵀ (the forward: O = N, L = K; dx: O = K, L = N). The model, in the docstring
    at the top of this file, by its terms:

        t_gemm  = max(2·M·O·L / F, (M·L + O·L + M·O)·d / BW)        the roofline of the GEMM
        fused   = t_gemm / (e · min(1, tiles / SMs))               tiles of 128 × 256
        cublas  = t_gemm + 2·M·O·d / BW                            t written, read back (beta = 1)

    F: the dense rate (bf16/fp16 tensor cores, or fp32 FMA = F_bf16 · FP32_RATE), BW: HBM
    bandwidth, d: bytes an element, e: our tiles' efficiency against cuBLAS's (TC_EFFICIENCY,
    FMA_EFFICIENCY for fp32), tiles / SMs: a grid smaller than the machine leaves SMs idle
    (cuBLAS splits K for those shapes; we do not)."""
    rate = peak.bf16_tflops * 1e12 * (FP32_RATE if fp32 else 1.0)
    bw = peak.hbm_gbps * 1e9
    d = dtype_bytes
    t_gemm = max(2 * M * O * L / rate, (M * L + O * L + M * O) * d / bw)
    e = efficiency if efficiency is not None else (FMA_EFFICIENCY if fp32 else TC_EFFICIENCY)
    tiles = -(-M // 128) * -(-O // 256)
    fused = t_gemm / (e * min(1.0, tiles / sms))
    cublas = t_gemm + 2 * M * O * d / bw
    return fused < cublas
