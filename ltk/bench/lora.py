"""lora: time and TFLOP/s of a LoRA linear layer, ours (fused Triton) against PEFT, over
shapes M×N×K at rank r, in the forward, backward and forward+backward modes.

    y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ          x (M, K), W (N, K) frozen, A (r, K), B (N, r), s = α / r
    dx = dy · W + s · (dy · B) · A,   dA = s · (dy · B)ᵀ · x,   dB = s · dyᵀ · (x · Aᵀ)

(Hu et al. 2021, arXiv 2106.09685, §4.1; the backward in ltk/kernels/lora.py.) The layers have no
bias, as a Llama projection. The unfused chain writes the (M, N) base output and the (M, N)
low-rank term, reads both back and writes their sum (4·M·N extra elements of traffic forward,
4·M·K for dx backward); ours adds the low-rank term in the GEMM's epilogue and stores y (and
dx) once. FLOPs are `kernels.lora.flops` (the same fused or not); bytes are
`kernels.lora.bytes_moved(fused=True)`, the least traffic, charged to every provider alike.
% of peak is against the device's dense matmul peak (ltk/bench/peaks.py).

Providers:
  ours            kernels.lora.lora_linear(backend="triton"): u = x·Aᵀ by a skinny kernel, then one
                  GEMM with the low-rank term in its epilogue; dx likewise (CUDA only: on a CPU
                  the Triton interpreter runs it, for correctness, never for timing)
  ours-reference  kernels.lora.lora_linear_reference: F.linear(x, W) + s·F.linear(F.linear(x, A), B)
  peft            PEFT's LoRA layer: a module holding one nn.Linear named "proj", wrapped by
                  get_peft_model(LoraConfig(target_modules=["proj"])), with the same W, A, B and
                  s copied in (where installed; runs on a CPU too)
  torch.compile   ours-reference compiled by inductor (CUDA only)

Gradients are taken for x, A and B (W frozen). Peak memory (CUDA) is the allocator's
high-water mark during one call above what was held before. A summary (stderr) prints
ours / peft per point; the goal is ≥ 1.2× on a GPU at M = 4096 tokens, N = K = 4096, r = 16.

    ltk bench lora                                         # CPU: 256 × 512×512, r = 16, fp32
    ltk bench lora --device cuda                           # GPU: 4096 × 4096×4096, r = 16, bf16
    ltk bench lora --device cuda --shapes 4096x11008x4096 --rank 64 --modes fwd+bwd
"""
from __future__ import annotations

import importlib
from functools import partial

import torch
import torch.nn as nn

from ltk.bench.nf4 import finish, matmul_row, start_sweep
from ltk.bench.sweep import DTYPES, Skip, SweepRows, kernel_unavailable, measure_point, release_memory
from ltk.training.progress import progress, ticking

PROVIDERS = ("ours", "ours-reference", "peft", "torch.compile")
BASELINE = "peft"
CUDA_SHAPES = ((4096, 4096, 4096),)  # (M, N, K)
CPU_SHAPES = ((256, 512, 512),)
GOAL = 1.2  # ours / peft on a GPU


def _lora():
    """The module ltk/kernels/lora.py (imported late: TRITON_INTERPRET must be set before it)."""
    return importlib.import_module("ltk.kernels.lora")


def _peft():
    import peft

    return peft


def unavailable(provider: str, dev: torch.device) -> str | None:
    """Why `provider` cannot run at all on `dev`, or None when it can."""
    return kernel_unavailable(provider, dev, {"peft": "peft"})


class _OneProjection(nn.Module):
    """The smallest model PEFT can wrap: one nn.Linear named "proj", its target."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_layer(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> tuple[nn.Module, list]:
    """(model, [lora_A weight, lora_B weight]): a PEFT-wrapped projection computing
    x·Wᵀ + (alpha / r)·(x·Aᵀ)·Bᵀ with copies of w, a, b, adapters in w's dtype (PEFT's
    autocast to fp32 off, so it computes in the same dtype as the other providers)."""
    peft = _peft()
    r = a.shape[0]
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(_OneProjection(w), cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_a.copy_(a)
        lora_b.copy_(b)
    return model, [lora_a, lora_b]


def build(provider: str, x, w, a, b, alpha: float):
    """(forward, inputs): the provider's LoRA linear from fresh leaf copies of x, A, B (the
    tensors that get gradients; W is frozen)."""
    scale = alpha / a.shape[0]
    if provider == "peft":
        x = x.detach().clone().requires_grad_(True)
        model, (lora_a, lora_b) = peft_layer(w, a, b, alpha)
        return (lambda: model(x)), [x, lora_a, lora_b]
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    lora = _lora()
    if provider == "ours":
        return (lambda: lora.lora_linear(x, w, None, a, b, scale, backend="triton")), [x, a, b]
    if provider == "ours-reference":
        return (lambda: lora.lora_linear_reference(x, w, None, a, b, scale)), [x, a, b]
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh, static-shape compile per point
        compiled = torch.compile(lora.lora_linear_reference, dynamic=False)
        return (lambda: compiled(x, w, None, a, b, scale)), [x, a, b]
    raise ValueError(f"unknown provider {provider!r}")


def make_inputs(M: int, N: int, K: int, r: int, dtype: torch.dtype, dev: torch.device, seed: int):
    """x (M, K) ~ N(0, 1); W (N, K) ~ N(0, 0.02²); A (r, K) and B (N, r) ~ N(0, 0.02²), B not
    zero (at step 0 it is, but the low-rank term must do real work to be timed and checked)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    w, a, b = (0.02 * torch.randn(*s, generator=gen) for s in ((N, K), (r, K), (N, r)))
    return [t.to(dev, dtype) for t in (x, w, a, b)]


def run(*, shapes: str | None = None, rank: int = 16, alpha: float = 32.0, dtype: str = "auto", modes: str = "all",
        providers: str = "all", min_time: float = 0.25, device: str = "auto", seed: int = 0) -> SweepRows:
    """Time every (shape, mode, provider) point; one Row each.

    shapes: comma list of M×N×K ("4096x4096x4096"); None = the device default (CUDA:
    4096×4096×4096; CPU: 256×512×512). rank: r. alpha: the scale is s = alpha / r. dtype:
    auto (bf16 on CUDA, fp32 on a CPU), fp32, fp16, bf16. modes, providers: comma lists or
    "all". min_time: timed seconds per point. seed: of the random inputs."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    dev, shape_list, dtype, mode_list, runnable, rows, env, peak, elem = start_sweep(
        shapes, dtype, modes, providers, device, CPU_SHAPES, CUDA_SHAPES, PROVIDERS, unavailable)
    lora = _lora()  # the cost model (flops, bytes_moved) is shared by every provider

    bar = progress(total=len(shape_list) * len(mode_list) * len(runnable), desc="lora", unit="point")
    for M, N, K in shape_list:
        x, w, a, b = make_inputs(M, N, K, rank, DTYPES[dtype], dev, seed)
        shape = f"M={M},N={N},K={K},r={rank}"
        for mode in mode_list:
            fl = lora.flops(M, N, K, rank, mode=mode)
            nbytes = lora.bytes_moved(M, N, K, rank, dtype_bytes=elem, bias=False, fused=True, mode=mode)
            for p in ticking(runnable, bar):
                result = measure_point(p, partial(build, p, x, w, a, b, alpha), mode, dev, min_time,
                                       baselines=("ours-reference",))
                if isinstance(result, Skip):
                    rows.skipped.append(Skip(p, f"{shape} {mode}", result.reason))
                    continue
                timing, peak_mb = result
                extra = {"M": M, "N": N, "K": K, "r": rank, "alpha": alpha, "scale": alpha / rank, "flops": fl,
                         "bytes": nbytes, "bytes_unfused": lora.bytes_moved(M, N, K, rank, dtype_bytes=elem,
                                                                             bias=False, fused=False, mode=mode),
                         "peak_flops": peak, "threads": env["torch_threads"],
                         "load_avg_1m_before": env["load_avg_1m"], "baseline": BASELINE}
                if mode == "bwd":
                    extra["timed"] = "dx, dA, dB (autograd.grad on a retained graph); W is frozen"
                rows.append(matmul_row(dev, "lora-linear", shape, dtype, mode, p, timing, fl, nbytes, peak, peak_mb,
                                       extra))
        del x, w, a, b
        release_memory(dev)
    bar.close()

    return finish(rows, BASELINE, GOAL, "M = 4096, N = K = 4096, r = 16 on a GPU")
