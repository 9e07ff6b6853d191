"""layernorm and rmsnorm: GB/s of the normalization layers, ours against PyTorch, the
compiler and Liger, over hidden sizes, in the forward, backward and forward+backward modes.

    LayerNorm  y = (x − μ) / √(σ² + ε) · w + b,   μ, σ² the mean and variance of a row
    RMSNorm    y = x / √(mean(x²) + ε) · w
    --residual h = x + r, y = Norm(h), returning both (the pre-norm block's residual stream)

A normalization does a few FLOPs per element (7 forward for LayerNorm), far fewer than the
hundreds a modern GPU can do in the time it takes to load that element from HBM (an H100:
989 TFLOP/s over 3.35 TB/s, about 300 FLOPs per byte): it is memory-bound, so its figure of
merit is bandwidth. GB/s = `bytes_moved(...)` / time, where
`bytes_moved` (ltk/kernels/layernorm.py, ltk/kernels/rmsnorm.py) counts the least traffic possible:
read x and the parameters once, write y once (plus the residual's reads and writes, the
per-row statistics, and in the backward dy, dx, dw). Every provider is charged that same
count, so a provider that moves more bytes shows up as fewer GB/s, which is what fusion buys.

The limit is the memory system. No kernel quite reaches the datasheet figure (% of peak, GPUs
only), so the goal is stated against what `dst.copy_(src)` reaches on the same device,
measured once per run (ltk/bench/peaks.py `measure_peaks`): copy reads and writes each byte once,
like a norm, so 100% of copy bandwidth is the practical ceiling. It is in each row's extra
(`pct_of_copy`) and printed in a table after the run. On a CPU a working set that fits in
the caches can beat a copy from main memory (over 100%): read CPU figures with that in mind.

Providers:
  ours           kernels.layernorm / kernels.rmsnorm, backend="triton" (CUDA only)
  torch          F.layer_norm / F.rms_norm (PyTorch's own fused kernels where it has them)
  unfused        the same math in plain ops (mean, subtract, square, mean, rsqrt, scale, shift),
                 computed in fp32 like the fused kernels: each op reads and writes a whole
                 tensor, several times the traffic of one fused pass
  torch.compile  `unfused` compiled by inductor, which fuses it into one or two kernels
  liger          Liger-Kernel's LayerNorm / RMSNorm functions (installed + CUDA only)

    ltk bench layernorm                                     # CPU: 1024 rows × 256, 1k, 4k, fp32
    ltk bench rmsnorm --device cuda --plot rmsnorm.png      # GPU: 4096 rows × 1k … 16k, bf16
    ltk bench rmsnorm --device cuda --residual --modes fwd,bwd
"""
from __future__ import annotations

import importlib
import inspect
import json
import sys

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, environment, resolve_device
from ltk.bench.peaks import measure_peaks, pct_of_peak, peak_for
from ltk.bench.sweep import (
    DTYPES,
    MODES,
    Skip,
    SweepRows,
    measure_point,
    parse_choices,
    parse_dtype,
    parse_sizes,
    plot_sweep,
    print_skipped,
    release_memory,
)
from ltk.training.progress import progress, ticking

PROVIDERS = ("ours", "torch", "unfused", "torch.compile", "liger")
BASELINE = "torch"
EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}
CUDA_SHAPES = (4096, (1024, 2048, 4096, 8192, 16384))  # (rows, hidden sizes)
CPU_SHAPES = (1024, (256, 1024, 4096))


def unfused_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm op by op, in fp32 (as the fused kernels compute). Each line is a separate
    kernel that reads and writes whole (rows, N) tensors; one fused kernel reads x once and
    writes y once."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # (rows, N), a cast: read x, write xf
    mu = xf.mean(-1, keepdim=True)  # (rows, 1)
    xc = xf - mu
    var = (xc * xc).mean(-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = xc * torch.rsqrt(var + eps)
    return (y * w.float() + b.float()).to(x.dtype)


def unfused_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm op by op, as Hugging Face's LlamaRMSNorm: statistics in fp32, the weight
    applied after casting back to the input dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    ms = (xf * xf).mean(-1, keepdim=True)  # (rows, 1)
    return w * (xf * torch.rsqrt(ms + eps)).to(x.dtype)


def _ours(op: str):
    """The module ltk/kernels/layernorm.py or ltk/kernels/rmsnorm.py: the functions and the cost model."""
    return importlib.import_module("ltk.kernels.layernorm" if op == "layernorm" else "ltk.kernels.rmsnorm")


def _liger(op: str):
    """Liger's autograd functions. RMSNorm's extra arguments keep their defaults (offset 0,
    Llama casting) except `in_place` where this version has it: in place, its backward
    overwrites the upstream gradient with dx, and the bwd mode re-uses one upstream gradient."""
    if op == "layernorm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    params = list(inspect.signature(LigerRMSNormFunction.forward).parameters)[1:]  # after ctx
    if "in_place" in params:
        defaults = {"offset": 0.0, "casting_mode": "llama", "in_place": False}
        n = params.index("in_place") + 1
        return lambda x, w, b, eps: LigerRMSNormFunction.apply(
            x, w, eps, *[defaults[p] for p in params[3:n]])
    return lambda x, w, b, eps: LigerRMSNormFunction.apply(x, w, eps)


def unavailable(provider: str, op: str, dev: torch.device) -> str | None:
    """Why `provider` cannot run at all on `dev`, or None when it can."""
    if provider == "ours":
        from ltk.kernels.backend import HAS_TRITON

        if not HAS_TRITON:
            return "ours needs the triton package"
        if dev.type != "cuda":
            return "ours needs CUDA: the Triton interpreter is for correctness, not timing"
    if provider == "liger":
        try:
            _liger(op)
        except ImportError:
            return "liger-kernel not installed"
        if dev.type != "cuda":
            return "liger needs CUDA"
    return None


def norm_fn(provider: str, op: str):
    """f(x, w, b, eps) -> y for a provider (b is None for RMSNorm)."""
    if provider == "ours":
        mod = _ours(op)
        if op == "layernorm":
            return lambda x, w, b, eps: mod.layer_norm(x, w, b, eps=eps, backend="triton")
        return lambda x, w, b, eps: mod.rms_norm(x, w, eps=eps, backend="triton")
    if provider == "torch":
        if op == "layernorm":
            return lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps)
        return lambda x, w, b, eps: F.rms_norm(x, (x.shape[-1],), w, eps)
    unfused = (lambda x, w, b, eps: unfused_layer_norm(x, w, b, eps)) if op == "layernorm" else \
              (lambda x, w, b, eps: unfused_rms_norm(x, w, eps))
    if provider == "unfused":
        return unfused
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh, static-shape compile per point
        return torch.compile(unfused, dynamic=False)
    if provider == "liger":
        return _liger(op)
    raise ValueError(f"unknown provider {provider!r}")


def build(provider: str, op: str, x, r, w, b, eps: float, residual: bool):
    """(forward, inputs) for one provider: fresh leaf copies of the tensors, requires_grad.
    With `residual`, forward returns (y, h), h = x + r: ours fuses the add into the kernel,
    the others add first (one more pass over memory)."""
    x, r, w = (t.detach().clone().requires_grad_(True) for t in (x, r, w))
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    inputs = [x, w] + ([b] if b is not None else []) + ([r] if residual else [])
    if provider == "ours" and residual:
        mod = _ours(op)
        if op == "layernorm":
            return (lambda: mod.layer_norm_residual(x, r, w, b, eps=eps, backend="triton")), inputs
        return (lambda: mod.rms_norm_residual(x, r, w, eps=eps, backend="triton")), inputs
    f = norm_fn(provider, op)
    if residual:
        def forward():
            h = x + r
            return f(h, w, b, eps), h
        return forward, inputs
    return (lambda: f(x, w, b, eps)), inputs


def run_norm(op: str, *, hidden_sizes: str | None = None, rows: int | None = None, residual: bool = False,
             dtype: str = "auto", modes: str = "all", providers: str = "all", min_time: float = 0.25,
             copy_mib: int | None = None, device: str = "auto", seed: int = 0,
             plot: str | None = None) -> SweepRows:
    """The sweep of `op` ("layernorm" or "rmsnorm"); see `run_layernorm`."""
    if op not in EPS:
        raise ValueError(f"op must be layernorm or rmsnorm, got {op!r}")
    dev = resolve_device(device)
    n_rows, sizes = CUDA_SHAPES if dev.type == "cuda" else CPU_SHAPES
    n_rows = rows or n_rows
    sizes = parse_sizes(hidden_sizes) if hidden_sizes is not None else list(sizes)
    dtype = parse_dtype(dtype, dev)
    mode_list = list(MODES) if modes == "all" else parse_choices(modes, MODES, "mode")
    wanted = list(PROVIDERS) if providers == "all" else parse_choices(providers, PROVIDERS, "provider")
    cost = _ours(op)  # the cost model (flops, bytes_moved) is shared by every provider
    eps, elem = EPS[op], DTYPES[dtype].itemsize

    out = SweepRows()
    skip_all = {p: why for p in wanted if (why := unavailable(p, op, dev))}
    out.skipped += [Skip(p, "*", why) for p, why in skip_all.items()]
    runnable = [p for p in wanted if p not in skip_all]
    env = environment(dev)  # read first: its load average is that of other processes
    # The practical ceiling, measured once on this device (the matmul part is not needed: tiny)
    copy_gbps = measure_peaks(dev, copy_mib=copy_mib, matmul_n=64, min_time=max(0.05, min_time))["copy_gbps"]
    datasheet = peak_for(env["device"]) if dev.type == "cuda" else None
    name = op + ("+residual" if residual else "")

    bar = progress(total=len(sizes) * len(mode_list) * len(runnable), desc=name, unit="point")
    for N in sizes:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x, r = (torch.randn(n_rows, N, generator=gen).to(dev, DTYPES[dtype]) for _ in range(2))
        w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dev, DTYPES[dtype])
        b = (0.1 * torch.randn(N, generator=gen)).to(dev, DTYPES[dtype]) if op == "layernorm" else None
        shape = f"rows={n_rows},cols={N}"
        for mode in mode_list:
            for p in ticking(runnable, bar):
                result = _measure(p, op, x, r, w, b, eps, residual, mode, dev, min_time)
                if isinstance(result, Skip):
                    out.skipped.append(Skip(p, f"{shape} {mode}", result.reason))
                    continue
                timing, peak_mb = result
                nbytes = cost.bytes_moved(n_rows, N, dtype_bytes=elem, mode=mode, residual=residual)
                fl = cost.flops(n_rows, N, mode=mode, residual=residual)
                seconds = timing.median_ms * 1e-3
                gbps = nbytes / seconds / 1e9
                extra = {"rows": n_rows, "cols": N, "residual": residual, "eps": eps, "bytes": nbytes,
                         "flops": fl, "copy_gbps": copy_gbps, "pct_of_copy": 100 * gbps / copy_gbps,
                         "datasheet": None if datasheet is None else datasheet.name,
                         "threads": env["torch_threads"], "load_avg_1m_before": env["load_avg_1m"],
                         "baseline": BASELINE}
                if residual and p != "ours":
                    extra["residual_add"] = "a separate op before the norm"
                out.append(Row.stamped(
                    dev, op=name, shape=shape, dtype=dtype, mode=mode, provider=p,
                    median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, runs=timing.runs,
                    tflops=fl / seconds / 1e12, gbps=gbps,
                    pct_of_peak=pct_of_peak(gbps, datasheet and datasheet.hbm_gbps),
                    peak_mem_mb=peak_mb, extra=json.dumps(extra, sort_keys=True)))
        del x, r, w, b
        release_memory(dev)
    bar.close()

    return finish_bandwidth_rows(out, BASELINE, copy_gbps, plot, x_key="cols", xlabel="hidden size N", title=name)


def finish_bandwidth_rows(out: SweepRows, baseline: str, copy_gbps: float, plot: str | None, *, x_key: str,
                          xlabel: str, title: str) -> SweepRows:
    """What every memory-bound sweep does at its end: speedups against `baseline` at each
    (shape, mode), the skips in each row's extra, the % of copy table and skips on stderr, and
    the GB/s plot against the measured copy bandwidth (x from each row's extra[x_key])."""
    base = {(r.shape, r.mode): r.median_ms for r in out if r.provider == baseline}
    for row in out:
        if (row.shape, row.mode) in base:
            row.speedup = base[(row.shape, row.mode)] / row.median_ms
        row.extra = json.dumps({**json.loads(row.extra), "skipped": out.skipped_summary()}, sort_keys=True)
    print_copy_table(out, copy_gbps)
    print_skipped(out.skipped)
    if plot:
        plot_sweep(out, plot, x=lambda r: json.loads(r.extra)[x_key], y=lambda r: r.gbps,
                   series=lambda r: r.provider, xlabel=xlabel, ylabel="GB/s", title=title,
                   hline=(copy_gbps, f"measured copy {copy_gbps:.0f} GB/s"))
    return out


def print_copy_table(rows: list[Row], copy_gbps: float, file=None) -> None:
    """The figure the goal is stated in: each row's GB/s as % of the measured copy bandwidth
    (stderr, so `--json` on stdout stays clean)."""
    file = file or sys.stderr
    print(f"measured copy bandwidth: {copy_gbps:.1f} GB/s; each row as % of it:", file=file)
    for r in rows:
        print(f"  {r.provider:14s} {r.shape:22s} {r.mode:8s} {r.gbps:9.1f} GB/s "
              f"{100 * r.gbps / copy_gbps:6.1f}%", file=file)


def _measure(provider, op, x, r, w, b, eps, residual, mode, dev, min_time):
    """(Timing, peak MiB or None), or a Skip on out-of-memory (any provider) or on another
    failure of an optional provider (ours, torch.compile, liger)."""
    return measure_point(provider, lambda: build(provider, op, x, r, w, b, eps, residual), mode, dev, min_time,
                         baselines=("torch", "unfused"))


def run_layernorm(*, hidden_sizes: str | None = None, rows: int | None = None, residual: bool = False,
                  dtype: str = "auto", modes: str = "all", providers: str = "all", min_time: float = 0.25,
                  copy_mib: int | None = None, device: str = "auto", seed: int = 0,
                  plot: str | None = None) -> SweepRows:
    """Time LayerNorm for every (hidden size, mode, provider); one Row each.

    hidden_sizes: comma list ("1k,4k"); None = the device default (CUDA: 1k … 16k with 4096
    rows; CPU: 256, 1k, 4k with 1024 rows). rows: rows of x. residual: time the fused
    residual variant (y, h) = (Norm(x + r), x + r). dtype: auto (bf16 on CUDA, fp32 on a CPU),
    fp32, fp16, bf16. modes, providers: comma lists or "all". copy_mib: size of the copy that
    measures bandwidth (None: bench.peaks' default). plot: write a PNG of GB/s against N."""
    return run_norm("layernorm", hidden_sizes=hidden_sizes, rows=rows, residual=residual, dtype=dtype,
                    modes=modes, providers=providers, min_time=min_time, copy_mib=copy_mib, device=device,
                    seed=seed, plot=plot)


def run_rmsnorm(*, hidden_sizes: str | None = None, rows: int | None = None, residual: bool = False,
                dtype: str = "auto", modes: str = "all", providers: str = "all", min_time: float = 0.25,
                copy_mib: int | None = None, device: str = "auto", seed: int = 0,
                plot: str | None = None) -> SweepRows:
    """Time RMSNorm for every (hidden size, mode, provider); the options are run_layernorm's."""
    return run_norm("rmsnorm", hidden_sizes=hidden_sizes, rows=rows, residual=residual, dtype=dtype,
                    modes=modes, providers=providers, min_time=min_time, copy_mib=copy_mib, device=device,
                    seed=seed, plot=plot)
