"""SwiGLU and GeGLU, the gated activations of the Llama and T5 1.1 MLPs, fused in Triton.

Shazeer 2020, "GLU Variants Improve Transformer" (arXiv 2002.05202), eq. 5-6: the MLP's hidden
layer is the product of an activated gate and a linear "up" projection,

    y = act(g) ∘ u,   g = x W_gate,  u = x W_up          (then the down projection: y W_down)

    SwiGLU   act = silu(g) = g · σ(g)                                       (Llama, eq. 6)
    GeGLU    act = gelu(g) = g · Φ(g) = ½ g (1 + erf(g / √2))             (approximate="none")
             act ≈ ½ g (1 + tanh(√(2/π) (g + 0.044715 g³)))                (approximate="tanh": T5 1.1;
                                                                Hendrycks & Gimpel 2016, eq. 2)

Backward, elementwise, with the upstream gradient dy:

    du = dy ∘ act(g)
    dg = dy ∘ u ∘ act'(g)

    silu'(g)       = σ + g σ (1 − σ) = σ (1 + g (1 − σ))
    gelu'(g)       = Φ(g) + g φ(g),   φ(g) = exp(−g²/2) / √(2π)
    gelu_tanh'(g)  = ½ (1 + t) + ½ g (1 − t²) √(2/π) (1 + 3·0.044715 g²),   t = tanh(√(2/π)(g + 0.044715 g³))

The I/O argument. A few FLOPs and one transcendental an element against, in bf16, 6 bytes moved
forward (read g, u; write y) and 10 backward (read g, u, dy; write dg, du): memory-bound, the
time is the bytes. PyTorch eager runs act(g) and the product as two kernels and autograd keeps
act(g) for the backward: forward 5 passes instead of 3 (write and re-read act(g)), and the
backward reads the saved act(g) besides g, u, dy and runs 3-4 kernels (silu's backward, two
products; for the op-by-op tanh GELU of T5 about ten).

`recompute` (the backward's inputs):
    True   save only g and u; the backward recomputes act(g) and act'(g) (Liger-Kernel, unsloth):
           the saved activations are g and u alone, which the projections' outputs already are.
    False  the forward also writes act(g) (in g's dtype), as eager PyTorch keeps it, and the
           backward reads it for du: one more tensor kept per MLP (F elements a token) and 2 more
           bytes an element moved each way. It still evaluates act'(g), so it saves no
           transcendental: the setting exists to measure what recomputing is worth.

Numerics: each element is computed in fp32 from the inputs as stored and rounded once to the
output dtype (eager bf16 rounds act(g) to bf16 before the product: an ulp apart at most).
tanh(z) is evaluated as 2σ(2z) − 1: absolute error ~1e-7, where it enters gelu as 1 + t.

The kernels walk the flattened (contiguous) tensors in BLOCK-element pieces; inputs that are not
contiguous are copied first. The torch backend is eager PyTorch (`F.silu(g) * u`,
`F.gelu(g) * u`, T5's op-by-op tanh GELU times u) and ignores `recompute`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltk.kernels.backend import HAS_TRITON, check_float, check_same_device, resolve_backend
from ltk.kernels.norm_common import check_mode, on_device
from ltk.kernels.poison import output_allocator

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}  # the kernels' ACT constant
BLOCK = 2048      # elements a program handles: 8 warps × 32 threads × 8 (16-byte bf16 vectors)
NUM_WARPS = 8

# ---------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    _SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
    _TWO_SQRT_2_OVER_PI = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
    _INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
    _INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
    _GELU_C = tl.constexpr(0.044715)

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        """act(g) in fp32: silu (0), tanh GELU (1), erf GELU (2)."""
        if ACT == 0:
            a = g * tl.sigmoid(g)
        elif ACT == 1:
            t = 2.0 * tl.sigmoid(g * (1.0 + _GELU_C * g * g) * _TWO_SQRT_2_OVER_PI) - 1.0  # tanh(z) = 2σ(2z) − 1
            a = g * (0.5 * (1.0 + t))
        else:
            a = 0.5 * g * (1.0 + tl.erf(g * _INV_SQRT2))
        return a

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in fp32, sharing the transcendental (the module docstring's formulas)."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            d = s + a * (1.0 - s)                                       # σ (1 + g (1 − σ))
        elif ACT == 1:
            g2 = g * g
            t = 2.0 * tl.sigmoid(g * (1.0 + _GELU_C * g2) * _TWO_SQRT_2_OVER_PI) - 1.0
            half_1pt = 0.5 * (1.0 + t)
            a = g * half_1pt
            d = half_1pt + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * g2)
        else:
            cdf = 0.5 * (1.0 + tl.erf(g * _INV_SQRT2))
            a = g * cdf
            d = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
        return a, d

    @triton.jit
    def _glu_fwd_kernel(G, U, Y, A, N, ACT: tl.constexpr, SAVE_ACT: tl.constexpr, BLOCK: tl.constexpr):
        """y = act(g) ∘ u over elements [pid·BLOCK, pid·BLOCK + BLOCK); with SAVE_ACT also A = act(g)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N may pass 2**31
        mask = offs < N
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a = _act(g, ACT)
        tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)
        if SAVE_ACT:
            tl.store(A + offs, a.to(A.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(G, U, A, DY, DG, DU, N, ACT: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK: tl.constexpr):
        """du = dy ∘ act(g), dg = dy ∘ u ∘ act'(g); act(g) recomputed, or read from A (HAS_ACT)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        a, d = _act_and_grad(g, ACT)
        if HAS_ACT:  # the forward's act(g), as rounded to g's dtype (what eager's du uses)
            a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dy * u * d).to(DG.dtype.element_ty), mask=mask)


POISON_OUTPUTS = False             # NaN-filled outputs (tests, the GPU check): see ltk/kernels/poison.py
_empty = output_allocator(__name__)


# ---------------------------------------------------------------------------------------
# 2. Plain-PyTorch references (the torch backend; the tests run them in float64)
# ---------------------------------------------------------------------------------------
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) ≈ 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³))), written out op by op as the T5 1.1
    checkpoints were trained (F.gelu(approximate="tanh") is the same function but rounds
    differently, ~1e-7 relative, which an untied O(50) logit turns into ~1e-5)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def activation_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) in g's dtype, as eager PyTorch computes it."""
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu_tanh":
        return gelu_tanh(g)
    return F.gelu(g)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) ∘ up, the eager PyTorch of the models (bit for bit what they computed before the kernels)."""
    return activation_reference(gate, activation) * up


# ---------------------------------------------------------------------------------------
# 3. Autograd function and public API
# ---------------------------------------------------------------------------------------
def _launch_grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class GLUFunction(torch.autograd.Function):
    """y = act(gate) ∘ up for same-shape (..., F) tensors, with the Triton kernels above."""

    @staticmethod
    def forward(ctx, gate, up, activation: str, recompute: bool):
        shape = gate.shape
        g, u = gate.contiguous().view(-1), up.contiguous().view(-1)     # (n,), a copy only if strided
        n, act = g.numel(), ACTIVATIONS[activation]
        y = _empty((n,), torch.promote_types(g.dtype, u.dtype), g.device)
        a = None if recompute else _empty((n,), g.dtype, g.device)
        if n > 0:
            with on_device(g):
                _glu_fwd_kernel[_launch_grid(n)](g, u, y, a if a is not None else y, n, ACT=act,
                                                 SAVE_ACT=a is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
        ctx.shape, ctx.act = shape, act
        ctx.save_for_backward(g, u, a)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        g, u, a = ctx.saved_tensors
        dy = dy.contiguous().view(-1)
        n = g.numel()
        dg, du = _empty((n,), g.dtype, g.device), _empty((n,), u.dtype, u.device)
        if n > 0:
            with on_device(g):
                _glu_bwd_kernel[_launch_grid(n)](g, u, a if a is not None else g, dy, dg, du, n, ACT=ctx.act,
                                                 HAS_ACT=a is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return dg.view(ctx.shape), du.view(ctx.shape), None, None


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(gate, up, recompute, backend) -> str:
    check_float("gate", gate, _TORCH_DTYPES)
    check_float("up", up, _TORCH_DTYPES)
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)}, up has {tuple(up.shape)}: they must match")
    check_same_device(gate=gate, up=up)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be True or False, got {recompute!r}")
    backend = resolve_backend(backend, gate)
    if backend == "triton":
        check_float("gate", gate, _TRITON_DTYPES)
        check_float("up", up, _TRITON_DTYPES)
    return backend


def _glu(gate, up, activation, recompute, backend):
    if _check(gate, up, recompute, backend) == "torch":
        return glu_reference(gate, up, activation)
    return GLUFunction.apply(gate, up, activation, recompute)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, recompute: bool = True, backend: str = "auto") -> torch.Tensor:
    """silu(gate) ∘ up (Shazeer 2020, eq. 6) for gate and up of the same shape (..., F). The
    result has the promoted dtype of the two; the gradients come in each input's dtype. See the
    module docstring for the math and `recompute`."""
    return _glu(gate, up, "silu", recompute, backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, approximate: str = "tanh", recompute: bool = True,
          backend: str = "auto") -> torch.Tensor:
    """gelu(gate) ∘ up (Shazeer 2020, eq. 5's GEGLU), GELU exact (approximate="none", erf) or as
    T5 1.1's tanh approximation (approximate="tanh", the default)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return _glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu", recompute, backend)


# ---------------------------------------------------------------------------------------
# 4. Cost model
# ---------------------------------------------------------------------------------------
# FLOPs an element, a transcendental (exp, erf) counted as one, a division as one:
#   silu       fwd σ 3 (exp, add, rcp), g·σ, ·u = 5;  bwd σ 3, g·σ, σ(1 + g(1 − σ)) 3, dy·a, dy·u·d 2 = 10
#   gelu_tanh  fwd z 4, tanh via σ 5, ½g(1 + t) 2, ·u = 12;  bwd the same 11, derivative 7, products 3 = 21
#   gelu       fwd erf, ·1/√2, ½(1 + ·) 2, g·, ·u = 6;  bwd 5, φ 4 (square, scale, exp, ·g), + 1, products 3 = 13
_FLOPS = {"silu": (5, 10), "gelu_tanh": (12, 21), "gelu": (6, 13)}


def flops(n: int, *, activation: str = "silu", mode: str = "fwd") -> int:
    """FLOPs for n elements (rows × F) of y = act(g) ∘ u (the table above)."""
    check_mode(mode)
    fwd, bwd = _FLOPS[activation]
    return n * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bytes_moved(n: int, *, dtype_bytes: int = 2, mode: str = "fwd", recompute: bool = True) -> int:
    """The least HBM traffic of the fused kernels for n elements, all tensors in one dtype:

    forward   read g, u; write y (+ write act(g) without recompute)          3 (4) tensors
    backward  read g, u, dy (+ act(g)); write dg, du                          5 (6) tensors"""
    check_mode(mode)
    fwd = (3 + (not recompute)) * n * dtype_bytes
    bwd = (5 + (not recompute)) * n * dtype_bytes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
