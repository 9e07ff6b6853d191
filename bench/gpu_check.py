"""The GPU check: one command that, on a CUDA machine, (1) runs every Triton kernel compiled
for real against its float64 reference in fp16 and bf16 — outputs and every gradient —
(2) times the kernel benchmarks against PyTorch, torch.compile, flash-attn and Liger where
installed, and (3) times a GPT-2 124M training step against transformers; then prints one
table and writes one markdown report with the device, driver, versions and commit.

    python -m bench.gpu_check                       # everything, about 5-8 minutes on an H100/H200
    python -m bench.gpu_check --only correctness    # the numerics alone, under a minute
    python -m bench.gpu_check --out bench/results   # where the report goes

The CPU test suite checks the kernels through Triton's interpreter, which cannot check
bf16 (its bf16 arithmetic is wrong) nor anything about compiled code (register pressure,
masking of partial tiles on real hardware, races between programs). This script is where
those are checked. Pass rule (as in the tests, FlashAttention's rule): the kernel's error
against float64 is at most 4x the error PyTorch's own op makes in the same precision, plus
a small floor. Nothing is skipped silently: every skipped provider or check is listed.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
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

    from kernels.attention import attention
    from kernels.layernorm import layer_norm, layer_norm_residual
    from kernels.rmsnorm import rms_norm, rms_norm_residual

    # fill outputs with NaN before every launch, so an element a kernel forgets to write fails;
    # the flags are put back at the end, so the benchmarks after this time no extra fill
    poisoned = {}
    for module in ("kernels.attention", "kernels.layernorm", "kernels.rmsnorm", "kernels.nf4_triton",
                   "kernels.lora_triton"):
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
    from kernels.nf4 import dequantize_nf4, nf4_matmul, quantize_nf4

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
    from kernels.lora import lora_linear

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


def benchmarks(device: torch.device, quick: bool) -> tuple[list, list[str]]:
    """The benchmark sweep, sized for a few minutes on one GPU; returns (rows, skipped).
    torch.compile recompiles for every shape, so it is timed at one attention length only."""
    from bench import run_benchmark

    seqs = "1k,4k" if quick else "1k,4k,16k"
    fast = "ours,torch,sdpa,flash-attn"
    plan = [
        ("attention", dict(seq_lens=seqs, causal=True, modes="fwd,fwd+bwd", providers=fast, min_time=0.3)),
        ("attention", dict(seq_lens="4k", causal=True, modes="fwd,fwd+bwd", providers="torch.compile", min_time=0.3)),
        ("attention", dict(seq_lens="4k", causal=False, modes="fwd,fwd+bwd", providers=fast, min_time=0.3)),
        ("layernorm", dict(modes="fwd,bwd", providers="ours,torch,unfused,liger", min_time=0.3)),
        ("rmsnorm", dict(modes="fwd,bwd", providers="ours,torch,unfused,liger", min_time=0.3)),
        ("nf4", dict(shapes="4096x4096x4096,4096x11008x4096", providers="ours,ours-reference,bitsandbytes,dense",
                     min_time=0.2)),
        ("lora", dict(providers="ours,ours-reference,peft", min_time=0.2)),
        ("train-step", dict(preset="gpt2-124m", batch_size=16, min_time=4.0, rounds=2)),
    ]
    rows, skipped = [], []
    for name, kwargs in plan:
        t0 = time.perf_counter()
        try:
            result = run_benchmark(name, device=str(device), **kwargs)
            rows += list(result)
            skipped += [f"{name}: {s.provider} at {s.point}: {s.reason}" for s in getattr(result, "skipped", [])]
        except Exception as e:
            skipped.append(f"{name} {kwargs}: {type(e).__name__}: {e}"[:300])
            traceback.print_exc()
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, skipped


def machine(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = "unknown"
    for pkg in ("flash_attn", "liger_kernel", "transformers"):
        try:
            mod = __import__(pkg)
            info[pkg] = getattr(mod, "__version__", "installed")
        except ImportError:
            info[pkg] = "not installed"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return info


def report(info: dict, checks: list[Check], rows: list, skipped: list[str]) -> str:
    from bench.harness import rows_to_markdown

    lines = [f"# GPU check on {info['device']} ({info['date'][:10]})", "",
             "Command: `python -m bench.gpu_check`", "", "## Machine", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    n_pass = sum(c.passed for c in checks)
    lines += ["", f"## Kernels compiled for real vs float64 reference: {n_pass}/{len(checks)} pass", "",
              "Error = max|ours − ref| / max|ref| per output and gradient (worst shown); "
              "pass when ≤ 4 × PyTorch's own error in the same dtype + floor.", "",
              "| kernel | case | dtype | worst error (ours) | PyTorch's error there | result |", "|---|---|---|---|---|---|"]
    for c in checks:
        if c.errors:
            worst = max(c.errors, key=lambda k: c.errors[k] / (4 * c.torch_errors[k] + FLOOR[c.dtype]))
            lines.append(f"| {c.kernel} | {c.case} | {c.dtype} | {worst}: {c.errors[worst]:.2e} | "
                         f"{c.torch_errors[worst]:.2e} | {'PASS' if c.passed else 'FAIL'} |")
        else:
            lines.append(f"| {c.kernel} | {c.case} | {c.dtype} | — | — | ERROR {c.note} |")
    if rows:
        lines += ["", "## Benchmarks", "", rows_to_markdown(rows)]
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in skipped] or ["- nothing"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["correctness", "benchmarks"], help="run one half only")
    p.add_argument("--quick", action="store_true", help="a shorter benchmark sweep")
    p.add_argument("--out", default="bench/results", help="folder for the markdown report and CSV")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA device: none is visible here, so nothing was checked.\n"
              "The CPU test suite (python -m pytest) checks the kernels through Triton's interpreter.")
        return 2
    device = torch.device("cuda")
    info = machine(device)
    print(json.dumps(info, indent=1), flush=True)
    t0 = time.perf_counter()
    checks = [] if args.only == "benchmarks" else correctness_checks(device)
    print(f"[gpu_check] correctness: {sum(c.passed for c in checks)}/{len(checks)} pass "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, skipped = ([], []) if args.only == "correctness" else benchmarks(device, args.quick)
    text = report(info, checks, rows, skipped)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in info["device"].lower()).strip("-")
    path = out / f"gpu-check_{slug}_{info['date'][:10]}.md"
    path.write_text(text)
    if rows:
        from bench.harness import write_csv

        write_csv(rows, out / f"gpu-check_{slug}_{info['date'][:10]}.csv")
    print(f"wrote {path}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
