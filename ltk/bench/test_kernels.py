"""pytest-benchmark suites of the kernels (layernorm, rmsnorm, lora, nf4, attention), beside
the train-step one (ltk/bench/test_train_step.py), for regression tracking.

Kept apart from tests/ (which checks correctness, and is all CI runs: pyproject's testpaths):
this times. Each op's providers and inputs come from its sweep (ltk/bench/norms.py, lora.py,
nf4.py, attention.py), so a provider here computes exactly what `ltk bench OP` times; one
shape per op, small on a CPU and a representative one on CUDA. A provider that cannot run
skips with the sweep's reason: on a CPU that is ours (the Triton interpreter is for
correctness, never for timing) and the CUDA-only baselines, so a CPU times the references.

    pytest ltk/bench/test_kernels.py                          # every op, both modes
    pytest ltk/bench/test_kernels.py -k lora --benchmark-json=lora.json
    pytest-benchmark compare                                  # (or --benchmark-compare)

On CUDA each call synchronizes at its end: pytest-benchmark reads a wall clock.
"""
from __future__ import annotations

import pytest
import torch

import ltk.bench.attention as bench_attention
import ltk.bench.lora as bench_lora
import ltk.bench.nf4 as bench_nf4
import ltk.bench.norms as bench_norms
from ltk.bench.harness import resolve_device
from ltk.bench.sweep import timed_call

DEVICE = resolve_device("auto")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
MODES = ("fwd", "fwd+bwd")


def _norm(op: str):
    rows, hidden = (4096, 4096) if CUDA else (256, 512)

    def make(provider: str):
        g = torch.Generator().manual_seed(0)
        x, r = (torch.randn(rows, hidden, generator=g).to(DEVICE, DTYPE) for _ in range(2))
        w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, DTYPE)
        b = (0.1 * torch.randn(hidden, generator=g)).to(DEVICE, DTYPE) if op == "layernorm" else None
        return bench_norms.build(provider, op, x, r, w, b, bench_norms.EPS[op], residual=False)
    return make, lambda p: bench_norms.unavailable(p, op, DEVICE), f"rows={rows},N={hidden}"


def _lora():
    M, N, K, r = (4096, 4096, 4096, 16) if CUDA else (128, 256, 256, 16)

    def make(provider: str):
        x, w, a, b = bench_lora.make_inputs(M, N, K, r, DTYPE, DEVICE, seed=0)
        return bench_lora.build(provider, x, w, a, b, alpha=2.0 * r)
    return make, lambda p: bench_lora.unavailable(p, DEVICE), f"M={M},N={N},K={K},r={r}"


def _nf4():
    M, N, K = (4096, 4096, 4096) if CUDA else (64, 256, 256)

    def make(provider: str):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(DEVICE, DTYPE)
        w = (0.02 * torch.randn(N, K, generator=g)).to(DEVICE, DTYPE)
        return bench_nf4.build(provider, x, w, *bench_nf4.quantize(w))
    return make, lambda p: bench_nf4.unavailable(p, DEVICE), f"M={M},N={N},K={K}"


def _attention():
    B, H, T, D = (4, 16, 2048, 128) if CUDA else (1, 4, 128, 32)

    def make(provider: str):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE, DTYPE) for _ in range(3))
        return bench_attention.build(provider, q, k, v, True, D ** -0.5)
    dtype = "bf16" if CUDA else "fp32"
    return make, lambda p: bench_attention.unavailable(p, DEVICE, dtype), f"B={B},H={H},T={T},D={D},causal"


SUITES = {"layernorm": lambda: _norm("layernorm"), "rmsnorm": lambda: _norm("rmsnorm"), "lora": _lora,
          "nf4": _nf4, "attention": _attention}
PROVIDERS = {"layernorm": ("ours", "torch", "liger"), "rmsnorm": ("ours", "torch", "liger"),
             "lora": ("ours", "ours-reference", "peft"), "nf4": ("ours", "ours-reference", "dense", "bitsandbytes"),
             "attention": ("ours", "torch", "sdpa", "flash-attn")}
CASES = [(op, p) for op, providers in PROVIDERS.items() for p in providers]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op,provider", CASES, ids=[f"{op}-{p}" for op, p in CASES])
def test_kernel(benchmark, op, provider, mode):
    make, unavailable, shape = SUITES[op]()
    reason = unavailable(provider)
    if reason:
        pytest.skip(reason)
    forward, inputs = make(provider)
    call = timed_call(forward, inputs, mode)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def timed() -> None:
        call()
        sync()

    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(shape=shape, dtype=str(DTYPE), device=str(DEVICE))
    benchmark.pedantic(timed, warmup_rounds=2, rounds=10 if not CUDA else 30, iterations=1)
