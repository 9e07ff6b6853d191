"""The GPU check's calibration part: each autotune candidate of our kernels timed on the GPU, beside
the static ceiling the kernel-static report (ltk/bench/kernel_static.py) gives it.

The static report reads every candidate's SASS without a GPU and bounds what its inner loop can
reach (an issue-bound fraction of tensor-core peak); this part measures what it does reach, so
the model is checked the first time a GPU is available. Each spec of ltk/bench/static_specs.py
with a builder in BUILDERS is run through its public op at the spec's shape in bf16: where the
kernel is autotuned, the autotuner is pinned to one candidate at a time (its `configs` replaced,
its cache cleared), so every candidate is compiled and timed in turn; a kernel with one config is
timed once. The backward kernels (attention dK/dV, dQ; NF4's dx) are timed as the whole backward
pass with the candidate pinned (LoRA's dx GEMM too), the others as the op's forward (NF4's flat
specs at K = 4095, the path a K that is not row-aligned takes). Measured: median ms
(triton.testing.do_bench, L2 flushed), TFLOP/s and % of the device's datasheet bf16 peak; the
static ceiling and registers come from the newest committed kernel-static CSV (sm_90a, bf16).
A spec without a builder, or one that fails, is listed as skipped with its reason.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
B, H, T, D = 2, 16, 4096, 128  # attention: the static spec's T = S = 4096, D = 128
MNK = 4096  # NF4, LoRA, the floor: M = N = K = 4096


def _attention(which: str, dev) -> tuple[Callable[[], object], float]:
    from ltk.kernels.attention import attention, flops

    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    kw = dict(causal=True, backend="triton")
    if "bias" in which:
        kw["bias"] = torch.randn(1, 1, T, T, device=dev, dtype=torch.float32)
    if "padding" in which:  # the last eighth of each row's keys padded: the bias-masked table
        kw["key_padding_mask"] = (torch.arange(T, device=dev) < T - T // 8).expand(B, T).contiguous()
    if "segments" in which:
        kw["segment_ids"] = torch.arange(T, device=dev).div(T // 4, rounding_mode="floor").expand(B, T).contiguous()
    if ".bwd" in which:
        o = attention(q, k, v, **kw)
        do = torch.randn_like(o)
        return (lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)), \
            flops(B, H, T, T, D, causal=True, mode="bwd")
    return (lambda: attention(q.detach(), k.detach(), v.detach(), **kw)), flops(B, H, T, T, D, causal=True)


def _nf4(which: str, dev):
    from ltk.kernels.nf4 import nf4_matmul, quantize_nf4

    k = MNK - 1 if "flat" in which else MNK  # the flat path: K not row-aligned, as the spec says
    bwd = ".matmul_bwd" in which
    w = torch.randn(MNK, k, device=dev, dtype=torch.bfloat16)
    packed, absmax = quantize_nf4(w)
    x = torch.randn(MNK, k, device=dev, dtype=torch.bfloat16, requires_grad=bwd)
    if bwd:
        y = nf4_matmul(x, packed, absmax, w.shape, backend="triton")
        dy = torch.randn_like(y)
        return (lambda: torch.autograd.grad(y, x, dy, retain_graph=True)), 2.0 * MNK * MNK * k
    return (lambda: nf4_matmul(x, packed, absmax, w.shape, backend="triton")), 2.0 * MNK * MNK * k


def _lora(which: str, dev):
    from ltk.kernels.lora import lora_linear

    dx = which.endswith(" dx")  # the dx GEMM: timed as the backward pass
    x = torch.randn(MNK, MNK, device=dev, dtype=torch.bfloat16, requires_grad=dx)
    w = torch.randn(MNK, MNK, device=dev, dtype=torch.bfloat16)
    a, b = (torch.randn(*s, device=dev, dtype=torch.bfloat16) for s in ((16, MNK), (MNK, 16)))
    bias = torch.randn(MNK, device=dev, dtype=torch.bfloat16)
    flops = 2.0 * MNK ** 3 + 4.0 * MNK * MNK * 16
    if dx:
        y = lora_linear(x, w, None, a, b, 2.0, backend="triton")
        dy = torch.randn_like(y)
        return (lambda: torch.autograd.grad(y, x, dy, retain_graph=True)), flops
    return (lambda: lora_linear(x, w, bias, a, b, 2.0, backend="triton")), flops


BUILDERS = {"attention.": _attention, "nf4.matmul": _nf4, "lora.gemm_lowrank": _lora}


def static_rows(folder: Path = RESULTS) -> dict[tuple[str, str], dict]:
    """(kernel, candidate) -> the static row's extra, from the newest kernel-static CSV (sm_90a, bf16)."""
    files = sorted(folder.glob("kernel-static_*.csv"), key=lambda p: p.stem.rsplit("_", 1)[-1])
    if not files:
        return {}
    out = {}
    with files[-1].open(newline="") as f:
        for rec in csv.DictReader(f):
            if rec["mode"] == "sm_90a" and rec["dtype"] == "bf16":
                out[(rec["op"], rec["shape"])] = json.loads(rec["extra"])
    return out


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def time_candidates(device: torch.device, time_fn=None) -> tuple[list[str], list[str]]:
    """(markdown lines of the table, skipped lines). `time_fn(fn) -> ms` defaults to do_bench's median."""
    from ltk.bench.kernel_static import _resolve, _unwrap, candidates
    from ltk.bench.peaks import peak_for
    from ltk.bench.static_specs import all_specs

    time_fn = time_fn or _do_bench
    peak = peak_for(torch.cuda.get_device_name(device))
    static = static_rows()
    lines = ["| kernel | candidate | median ms | TFLOP/s | % of bf16 peak | static ceiling | regs | spills st/ld B |",
             "|---|---|---|---|---|---|---|---|"]
    skipped = []
    for spec in all_specs():
        if spec.provider != "ours":
            continue
        build = next((f for prefix, f in BUILDERS.items() if spec.name.startswith(prefix)), None)
        if build is None:
            skipped.append(f"candidate timing: {spec.name}: no builder (its op is timed by its benchmark)")
            continue
        _, tuner = _unwrap(_resolve(spec.kernel))
        original = list(tuner.configs) if tuner is not None else None
        try:
            arch = "sm_90a" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"  # its candidate list
            for cand in candidates(spec, "bf16", arch):
                if tuner is not None:
                    tuner.configs = [c for c in original if dict(c.kwargs) == cand.kwargs
                                     and c.num_warps == cand.num_warps and c.num_stages == cand.num_stages]
                    tuner.cache.clear()
                fn, flops = build(spec.name, device)
                fn()  # compile outside the timing
                ms = time_fn(fn)
                tflops = flops / ms / 1e9
                pct = "" if peak is None else f"{100 * tflops / peak.bf16_tflops:.1f}"
                s = static.get((spec.name, cand.label), {})
                ceil = "" if s.get("ceiling") is None else f"{100 * s['ceiling']:.0f}%"
                lines.append(f"| {spec.name} | {cand.label} | {ms:.3f} | {tflops:.1f} | {pct} | {ceil or '–'} "
                             f"| {s.get('regs', '')} | {s.get('spill_stores', '')}/{s.get('spill_loads', '')} |")
        except Exception as e:  # listed, the other kernels go on
            skipped.append(f"candidate timing: {spec.name}: {type(e).__name__}: {e}"[:300])
        finally:
            if tuner is not None:  # the autotuner as it was: all candidates, nothing cached
                tuner.configs = original
                tuner.cache.clear()
    return lines, skipped
