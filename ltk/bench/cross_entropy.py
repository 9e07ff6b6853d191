"""cross-entropy: the loss step of a language model, forward + backward of CE(h·Wᵀ, y) for h (N, d),
the LM head W (V, d) and targets y (N,), with and without the (N, V) logits: time and peak
memory over vocabularies V and token counts N.

The logits are the largest tensor of a training step: N·V elements (8,192 tokens × Llama 3's
128,256 classes: 4.2 GB in fp32), and the unfused path holds several of that size at once (the
logits, the saved log-probabilities, the gradient of each). The fused loss
(ltk/kernels/fused_linear_ce.py) never builds them: it walks row chunks, computing each chunk's
logits, loss and gradient and, in the same forward, dh and the fp32 dW. Both do the same three
matmuls (6·N·d·V FLOPs: `flops` there), so TFLOP/s compares their speed and the peak their memory.

    fused          ours: fused_linear_cross_entropy (the Triton CE kernel on CUDA, the chunked
                   torch path on a CPU), default chunk (256 MiB budget)
    torch          F.cross_entropy(F.linear(h, W).float(), y): the full logits, as
                   ltk/training/objectives.py computes the loss (.float() is a no-op in fp32)
    torch.compile  `torch` compiled by inductor (CUDA only, as the other kernel sweeps)
    liger          Liger-Kernel's LigerFusedLinearCrossEntropyLoss (installed + CUDA only)

Peak memory is what the step allocates above its inputs (h, W, y), the gradients it returns
included. CUDA: the allocator's high-water mark. CPU: each (point, provider) runs in a fresh
process, which reads the kernel's RSS high-water mark (VmHWM, reset just before the step, as
ltk/training/memory_watch.py does per phase) minus the RSS at that moment; nothing earlier in
the process can lend the step freed memory that would hide its peak.

    ltk bench cross-entropy                                  # CPU: N 1k, 4k × V 8k, 32k, d 256, fp32
    ltk bench cross-entropy --preset llama3-8k               # N 8,192, d 2,048, V 128,256: the memory check
    ltk bench cross-entropy --device cuda --vocab-sizes 32000,128256
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, Timing, environment, resolve_device, time_fn
from ltk.bench.peaks import pct_of_peak, peak_for
from ltk.bench.sweep import (
    DTYPES,
    NEEDS_CUDA,
    Skip,
    SweepRows,
    measure_point,
    parse_choices,
    parse_dtype,
    parse_sizes,
    print_skipped,
)

PROVIDERS = ("fused", "torch", "torch.compile", "liger")
BASELINE = "torch"
CPU_DEFAULTS = dict(tokens="1024,4096", vocab_sizes="8192,32768", hidden=256)
CUDA_DEFAULTS = dict(tokens="4096,8192", vocab_sizes="32000,50257,128256", hidden=2048)
PRESETS = {"llama3-8k": dict(tokens="8192", vocab_sizes="128256", hidden=2048, min_time=0.0)}
MEMORY_GOAL = 0.25  # the fused step's peak ≤ 1/4 of the unfused one's at the llama3-8k point


def torch_loss(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def loss_fn(provider: str, dev: torch.device):
    """f(h, W, y) -> scalar loss for a provider."""
    if provider == "fused":
        from ltk.kernels.fused_linear_ce import fused_linear_cross_entropy

        backend = "triton" if dev.type == "cuda" else "torch"
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend=backend)
    if provider == "torch":
        return torch_loss
    if provider == "torch.compile":
        torch._dynamo.reset()
        return torch.compile(torch_loss, dynamic=False)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: mod(w, h, y)
    raise ValueError(f"unknown provider {provider!r}")


def unavailable(provider: str, dev: torch.device) -> str | None:
    if provider == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
        if dev.type != "cuda":
            return "liger needs CUDA (its Triton kernels do not run on a CPU)"
    if provider == "torch.compile" and dev.type != "cuda":
        return "torch.compile is timed on CUDA only (on a CPU each point's C++ compile outlasts the sweep)"
    if provider == "fused" and dev.type == "cuda":
        from ltk.kernels.backend import HAS_TRITON

        if not HAS_TRITON:
            return NEEDS_CUDA
    return None


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, dev: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dev, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=gen) * d ** -0.5).to(dev, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen).to(dev)
    return h, w, y


def cpu_point(spec: dict) -> dict:
    """One (point, provider) on the CPU, in this process (run by `measure_cpu` in a fresh one):
    the peak of the first step, then its timing."""
    import gc

    from ltk.training.memory_watch import peak_rss_bytes, reset_peak_rss, rss_bytes

    dev = torch.device("cpu")
    h, w, y = make_inputs(spec["n"], spec["d"], spec["v"], DTYPES[spec["dtype"]], dev, spec["seed"])
    fn = loss_fn(spec["provider"], dev)

    def step():
        return torch.autograd.grad(fn(h, w, y), [h, w])

    gc.collect()
    exact = reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    out = step()
    first_ms = (time.perf_counter() - t0) * 1e3
    peak = peak_rss_bytes() - base
    del out
    if spec["min_time"] > 0:
        timing = time_fn(step, device=dev, warmup=0.0, min_time=spec["min_time"])
        samples, runs = list(timing.samples_ms), timing.runs
    else:
        samples, runs = [first_ms], 1
    return {"samples_ms": samples, "runs": runs, "peak_bytes": peak, "exact_peak": exact}


def measure_cpu(spec: dict, timeout: float = 3600.0):
    """cpu_point in a fresh interpreter: (Timing, peak MiB, peak source) or a Skip."""
    code = ("import json, sys; from ltk.bench.cross_entropy import cpu_point; "
            "print(json.dumps(cpu_point(json.loads(sys.argv[1]))))")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
        return Skip(spec["provider"], "", "out of memory" if run.returncode in (-9, 137) else f"failed: {tail[:160]}")
    res = json.loads(run.stdout.strip().splitlines()[-1])
    source = "VmHWM" if res["exact_peak"] else "VmHWM since start (reset refused)"
    return Timing.from_samples(res["samples_ms"], res["runs"]), res["peak_bytes"] / 2**20, source


def run(*, vocab_sizes: str | None = None, tokens: str | None = None, hidden: int | None = None,
        dtype: str = "auto", providers: str = "all", min_time: float | None = None, device: str = "auto",
        seed: int = 0, preset: str | None = None) -> SweepRows:
    """Time and peak memory of the loss step for every (N, V, provider); one Row each.

    vocab_sizes, tokens: comma lists ("32000,128256"; "4k,8k"); hidden: d. Defaults: CPU N 1k, 4k
    × V 8192, 32768, d 256; CUDA N 4k, 8k × V 32000, 50257, 128256, d 2048. preset "llama3-8k":
    N 8192, d 2048, V 128256 and one timed step each (min_time 0), the issue's memory check;
    explicit options override it. dtype: auto (bf16 on CUDA, fp32 on a CPU). min_time: timed
    seconds per point (default 0.25; 0 = the first step alone)."""
    from ltk.kernels.fused_linear_ce import bytes_moved, choose_chunk_rows, flops

    dev = resolve_device(device)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    base = {**(CUDA_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS), "min_time": 0.25, **PRESETS.get(preset, {})}
    ns = parse_sizes(tokens if tokens is not None else base["tokens"])
    vs = parse_sizes(vocab_sizes if vocab_sizes is not None else base["vocab_sizes"])
    d = hidden or base["hidden"]
    min_time = base["min_time"] if min_time is None else min_time
    dtype = parse_dtype(dtype, dev)
    wanted = list(PROVIDERS) if providers == "all" else parse_choices(providers, PROVIDERS, "provider")
    out = SweepRows()
    skip_all = {p: why for p in wanted if (why := unavailable(p, dev))}
    out.skipped += [Skip(p, "*", why) for p, why in skip_all.items()]
    runnable = [p for p in wanted if p not in skip_all]
    env = environment(dev)
    datasheet = peak_for(env["device"]) if dev.type == "cuda" else None
    elem = DTYPES[dtype].itemsize
    for n in ns:
        for v in vs:
            shape = f"N={n},d={d},V={v}"
            inputs = make_inputs(n, d, v, DTYPES[dtype], dev, seed) if dev.type == "cuda" else None
            for p in runnable:
                if dev.type == "cuda":
                    result = measure_point(p, lambda: ((lambda: loss_fn(p, dev)(*inputs)), list(inputs[:2])),
                                           "fwd+bwd", dev, max(min_time, 0.01), baselines=(BASELINE,))
                    result = result if isinstance(result, Skip) else (*result, "CUDA max_memory_allocated")
                else:
                    result = measure_cpu(dict(provider=p, n=n, d=d, v=v, dtype=dtype, seed=seed, min_time=min_time))
                if isinstance(result, Skip):
                    out.skipped.append(Skip(p, f"{shape} fwd+bwd", result.reason))
                    continue
                timing, peak_mb, source = result
                fl, seconds = flops(n, d, v), timing.median_ms * 1e-3
                chunk = choose_chunk_rows(n, v, DTYPES[dtype], "triton" if dev.type == "cuda" else "torch")
                nbytes = bytes_moved(n, d, v, dtype_bytes=elem, chunk_rows=chunk if p == "fused" else None)
                extra = {"N": n, "d": d, "V": v, "flops": fl, "bytes": nbytes, "peak_source": source,
                         "logits_mib": n * v * elem / 2**20, "chunk_rows": chunk if p == "fused" else None,
                         "threads": env["torch_threads"], "load_avg_1m_before": env["load_avg_1m"],
                         "baseline": BASELINE}
                out.append(Row.stamped(
                    dev, op="cross-entropy", shape=shape, dtype=dtype, mode="fwd+bwd", provider=p,
                    median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, runs=timing.runs,
                    tflops=fl / seconds / 1e12, gbps=nbytes / seconds / 1e9,
                    pct_of_peak=pct_of_peak(fl / seconds / 1e12, datasheet and datasheet.bf16_tflops),
                    peak_mem_mb=peak_mb, extra=json.dumps(extra, sort_keys=True)))
            inputs = None  # free before the next point's
    base_ms = {r.shape: r.median_ms for r in out if r.provider == BASELINE}
    for row in out:
        if row.shape in base_ms:
            row.speedup = base_ms[row.shape] / row.median_ms
        row.extra = json.dumps({**json.loads(row.extra), "skipped": out.skipped_summary()}, sort_keys=True)
    out.sections = {"Memory": memory_section(out)}
    print(out.sections["Memory"], file=sys.stderr)
    print_skipped(out.skipped)
    return out


def memory_ratios(rows) -> dict[str, float]:
    """{shape: peak of fused / peak of torch} where both ran."""
    peak = {(r.shape, r.provider): r.peak_mem_mb for r in rows}
    return {s: peak[(s, "fused")] / peak[(s, BASELINE)] for s, p in peak
            if p == BASELINE and (s, "fused") in peak and peak[(s, BASELINE)]}


def memory_section(rows) -> str:
    ratios = memory_ratios(rows)
    if not ratios:
        return "No point where both fused and torch ran."
    lines = ["| point | torch peak MiB | fused peak MiB | fused / torch |", "|---|---|---|---|"]
    peak = {(r.shape, r.provider): r.peak_mem_mb for r in rows}
    for s, q in ratios.items():
        lines.append(f"| {s} | {peak[(s, BASELINE)]:.0f} | {peak[(s, 'fused')]:.0f} | {q:.3f} |")
    check = "N=8192,d=2048,V=128256"
    if check in ratios:
        verdict = "met" if ratios[check] <= MEMORY_GOAL else "NOT met"
        lines.append(f"\nGoal (issue 17): at {check} the fused loss step's peak ≤ {MEMORY_GOAL} × the unfused "
                     f"one's: {ratios[check]:.3f}, {verdict}.")
    return "\n".join(lines)
