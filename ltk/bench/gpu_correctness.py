"""Part 1 of the GPU check (ltk/bench/gpu_check.py): every Triton kernel compiled for real against
its float64 reference in fp16 and bf16 — outputs and every gradient. Pass rule (as in the
tests, FlashAttention's rule): the kernel's error against float64 is at most 4x the error
PyTorch's own op makes in the same precision, plus a small floor (FLOOR, a few ulps of O(1)
values). The cases run on a CPU too (fp16 through the interpreter), which is how the tests
check the checker."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOOR = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-5}  # error floors (a few ulps of O(1) values)


@dataclass
class Check:
    kernel: str
    case: str
    dtype: str
    errors: dict[str, float] = field(default_factory=dict)  # tensor -> ours / max|ref|
    torch_errors: dict[str, float] = field(default_factory=dict)  # same for PyTorch's op
    passed: bool = False
    note: str = ""


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max |ref| (NaN anywhere counts as infinite error)."""
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _compare(kernel: str, case: str, dtype: str, run: Callable, inputs: list[torch.Tensor]) -> Check:
    """run(tensors, backend) -> output or tuple of outputs. The float64 run of PyTorch's op is
    the reference; our kernel and PyTorch's op then run in `dtype` with the same upstream
    gradients, and every output and input gradient is compared with the reference."""
    chk = Check(kernel, case, dtype)

    def outputs(tensors, backend, upstream=None):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
        out = run(leaves, backend)
        out = out if isinstance(out, tuple) else (out,)
        if upstream is None:
            gen = torch.Generator(device=out[0].device).manual_seed(0)
            upstream = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64) for o in out]
        torch.autograd.backward(list(out), [g.to(o.dtype) for g, o in zip(upstream, out)])
        return out, [t.grad for t in leaves if t.requires_grad], upstream

    ref_out, ref_grads, upstream = outputs([t.double() for t in inputs], "torch")
    low = [t.detach().to(DTYPES[dtype]).requires_grad_(t.requires_grad) for t in inputs]
    for backend, dest in (("triton", chk.errors), ("torch", chk.torch_errors)):
        out, grads, _ = outputs(low, backend, upstream)
        for i, (o, r) in enumerate(zip(out, ref_out)):
            dest[f"out{i}"] = _rel(o, r)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            dest[f"grad{i}"] = _rel(g, r)
    chk.passed = all(chk.errors[k] <= 4 * chk.torch_errors[k] + FLOOR[dtype] for k in chk.errors)
    return chk


def correctness_checks(device: torch.device) -> list[Check]:
    import importlib

    from ltk.kernels.attention import attention
    from ltk.kernels.layernorm import layer_norm, layer_norm_residual
    from ltk.kernels.rmsnorm import rms_norm, rms_norm_residual

    # fill outputs with NaN before every launch, so an element a kernel forgets to write fails;
    # the flags are put back at the end, so the benchmarks after this time no extra fill
    poisoned = {}
    for module in ("ltk.kernels.attention", "ltk.kernels.layernorm", "ltk.kernels.rmsnorm", "ltk.kernels.nf4_triton",
                   "ltk.kernels.lora_triton", "ltk.kernels.swiglu", "ltk.kernels.rope"):
        mod = importlib.import_module(module)
        if hasattr(mod, "POISON_OUTPUTS"):
            poisoned[mod], mod.POISON_OUTPUTS = mod.POISON_OUTPUTS, True

    def rnd(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=torch.float32).requires_grad_(grad)

    cases: list[tuple[str, str, Callable, list[torch.Tensor]]] = []
    for B, H, Hkv, T, S, D, causal in [(2, 8, 8, 1024, 1024, 128, True), (2, 8, 8, 1000, 1030, 64, False),
                                       (1, 8, 2, 777, 777, 96, True), (2, 4, 1, 333, 129, 32, False),
                                       (1, 16, 16, 4096, 4096, 128, True)]:
        q, k, v = rnd(B, H, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        name = f"B{B} H{H}/{Hkv} T{T} S{S} D{D}{' causal' if causal else ''}"
        cases.append(("attention", name,
                      lambda t, be, c=causal: attention(t[0], t[1], t[2], causal=c, backend=be), [q, k, v]))
    B, H, T, S, D = 2, 4, 200, 300, 64
    mask = torch.rand(B, S, device=device) > 0.2
    mask[1] = False  # a sequence with nothing to attend: zeros, not NaN
    cases.append(("attention", f"padding mask + bias (1,H,T,S) grad, T{T} S{S}",
                  lambda t, be: attention(t[0], t[1], t[2], key_padding_mask=mask, bias=t[3], backend=be),
                  [rnd(B, H, T, D), rnd(B, H, S, D), rnd(B, H, S, D), rnd(1, H, T, S)]))
    for rows, cols in [(4096, 4096), (1024, 16384), (333, 1023), (7, 65536)]:
        x, w, b, r = rnd(rows, cols), rnd(cols), rnd(cols), rnd(rows, cols)
        cases.append(("layernorm", f"{rows}x{cols}", lambda t, be: layer_norm(t[0], t[1], t[2], backend=be), [x, w, b]))
        cases.append(("rmsnorm", f"{rows}x{cols}", lambda t, be: rms_norm(t[0], t[1], backend=be), [x, w]))
    x, w, b, r = rnd(513, 4096), rnd(4096), rnd(4096), rnd(513, 4096)
    cases.append(("layernorm", "residual 513x4096",
                  lambda t, be: layer_norm_residual(t[0], t[1], t[2], t[3], backend=be), [x, r, w, b]))
    cases.append(("rmsnorm", "residual 513x4096",
                  lambda t, be: rms_norm_residual(t[0], t[1], t[2], backend=be), [x, r, w]))

    for rows, width, activation in [(4096, 14336, "silu"), (333, 1001, "silu"), (1000, 2816, "gelu_tanh"),
                                    (77, 4097, "gelu")]:
        cases.append(glu_case(rows, width, activation, device))
    for B, hq, hk, T, D, per_sequence, inplace in [(2, 32, 8, 1024, 128, False, False), (2, 6, 2, 37, 80, True, True),
                                                   (1, 4, 1, 333, 64, False, True)]:
        cases.append(rope_case(B, hq, hk, T, D, per_sequence, inplace, device))
    for M, N, K in [(4096, 4096, 4096), (1000, 11008, 4096), (333, 777, 1023), (1, 4096, 11008), (7, 257, 65)]:
        cases.append(nf4_case(M, N, K, device))
    for M, N, K, r, bias in [(4096, 4096, 4096, 16, False), (333, 1000, 777, 8, True), (1, 257, 129, 1, False),
                             (513, 11008, 4096, 64, False), (100, 300, 200, 128, True)]:
        cases.append(lora_case(M, N, K, r, bias, device))

    checks = []
    for kernel, case, run, inputs in cases:
        for dtype in ("fp16", "bf16"):
            try:
                checks.append(_compare(kernel, case, dtype, run, inputs))
            except Exception as e:  # a failure is a result, not a crash of the whole check
                checks.append(Check(kernel, case, dtype, note=f"{type(e).__name__}: {e}"[:200]))
    for mod, flag in poisoned.items():
        mod.POISON_OUTPUTS = flag
    return checks


def nf4_case(M: int, N: int, K: int, device, seed: int = 0) -> tuple[str, str, Callable, list[torch.Tensor]]:
    """y = x · Ŵᵀ with Ŵ an NF4 weight (N, K), blocksize 64; only x gets a gradient (W is
    frozen). The reference (float64, and PyTorch's own op in the low dtype) multiplies by the
    dequantized Ŵ — exact fp32 values, code · absmax — so the check measures the fused
    kernel's matmul error, not the quantization error."""
    from ltk.kernels.nf4 import dequantize_nf4, nf4_matmul, quantize_nf4

    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = (0.02 * torch.randn(N, K, generator=gen)).to(device)
    packed, absmax = quantize_nf4(w, 64)
    w_hat = dequantize_nf4(packed, absmax, (N, K), 64, torch.float32)  # exact: fp32 products

    def run(t, backend):
        if backend == "triton":
            return nf4_matmul(t[0], packed, absmax, (N, K), 64, backend="triton")
        return torch.nn.functional.linear(t[0], w_hat.to(t[0].dtype))  # = nf4_matmul(backend="torch") below fp64

    x = torch.randn(M, K, generator=gen).to(device).requires_grad_(True)
    return "nf4", f"M{M} N{N} K{K}", run, [x]


def lora_case(M: int, N: int, K: int, r: int, bias: bool, device, seed: int = 0
              ) -> tuple[str, str, Callable, list[torch.Tensor]]:
    """y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ, s = 2; gradients of x, A and B (W and b frozen)."""
    from ltk.kernels.lora import lora_linear

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    w, a, b_ = (0.05 * torch.randn(*s, generator=gen) for s in ((N, K), (r, K), (N, r)))
    b = 0.1 * torch.randn(N, generator=gen) if bias else None
    grad = {"x": True, "w": False, "b": False, "a": True, "B": True}
    named = {"x": x, "w": w, "a": a, "B": b_} | ({"b": b} if bias else {})
    inputs = [t.to(device).requires_grad_(grad[k]) for k, t in named.items()]

    def run(t, backend):
        xx, ww, aa, bb = t[:4]
        return lora_linear(xx, ww, t[4] if bias else None, aa, bb, 2.0, backend=backend)

    return "lora", f"M{M} N{N} K{K} r{r}{' bias' if bias else ''}", run, inputs


def glu_case(rows: int, width: int, activation: str, device, seed: int = 0
             ) -> tuple[str, str, Callable, list[torch.Tensor]]:
    """y = act(g) ∘ u (SwiGLU, or GeGLU with the tanh or erf GELU); gradients of g and u."""
    from ltk.kernels.swiglu import geglu, swiglu

    gen = torch.Generator(device="cpu").manual_seed(seed)
    g, u = (torch.randn(rows, width, generator=gen).to(device).requires_grad_(True) for _ in range(2))

    def run(t, backend):
        if activation == "silu":
            return swiglu(t[0], t[1], backend=backend)
        return geglu(t[0], t[1], approximate="tanh" if activation == "gelu_tanh" else "none", backend=backend)

    return "swiglu" if activation == "silu" else "geglu", f"{rows}x{width} {activation}", run, [g, u]


def rope_case(B: int, hq: int, hk: int, T: int, D: int, per_sequence: bool, inplace: bool, device, seed: int = 0
              ) -> tuple[str, str, Callable, list[torch.Tensor]]:
    """RoPE on q (B, Hq, T, D) and k (B, Hkv, T, D), both transposed views of (B, T, H, D) as the
    models pass them; cos/sin (T, D) from position 100, or (B, T, D) with an offset per sequence
    (in the activations' dtype, as the models cast them); in place on copies of q and k."""
    from ltk.kernels.rope import apply_rope
    from ltk.models.llama import rope_cos_sin

    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, hq, D, generator=gen).to(device).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, hk, D, generator=gen).to(device).transpose(1, 2).requires_grad_(True)
    pos = torch.arange(100, 100 + T)
    if per_sequence:
        pos = pos[None] + 37 * torch.arange(B)[:, None]                     # (B, T)
    cos, sin = rope_cos_sin(pos.to(device), D, 10000.0)

    def run(t, backend):
        qq, kk = (t[0] * 1, t[1] * 1) if inplace else (t[0], t[1])          # in place needs non-leaves
        return apply_rope(qq, kk, t[2], t[3], inplace=inplace, backend=backend)

    name = f"B{B} H{hq}/{hk} T{T} D{D}{' per-sequence' if per_sequence else ''}{' in place' if inplace else ''}"
    return "rope", name, run, [q, k, cos, sin]
