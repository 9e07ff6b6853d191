"""nf4: time and TFLOP/s of y = x · Wᵀ with W stored in 4-bit NormalFloat (QLoRA's frozen
base), ours against bitsandbytes' matmul_4bit, over shapes M×N×K, in the forward, backward
(dx only: the weight is frozen) and forward+backward modes.

    y = x · Ŵᵀ,  Ŵ[n, k] = NF4[q(n·K + k)] · absmax[(n·K + k) // 64]      x (M, K), W (N, K)
    dx = dy · Ŵ                                                          (no dW: W is frozen)

Both implementations store the same bytes (ltk/kernels/nf4.py is byte-exact with bitsandbytes'
quantize_4bit(quant_type="nf4"), blocksize 64, fp32 absmax: no double quantization here, so
every provider reads the same format). What differs is what happens to the weight per call:
`ours` dequantizes each (BLOCK_N, BLOCK_K) tile of W in registers inside the matmul and never
writes Ŵ; bitsandbytes (0.50) dequantizes the whole W to the compute dtype in a separate
kernel and calls a dense GEMM when M > 1536 (its fused cgemm_4bit only serves small M), and
always in the backward. FLOPs are `kernels.nf4.flops` (2·M·N·K a pass, ×2 for fwd+bwd);
bytes are `kernels.nf4.bytes_moved(fused=True)`, the least traffic the op needs (x, y and the
4-bit W once; the backward the same with dy, dx), charged to every provider alike, so a
provider that writes and re-reads Ŵ shows fewer GB/s. % of peak is against the device's
dense matmul peak (ltk/bench/peaks.py).

Providers:
  ours            kernels.nf4.nf4_matmul(backend="triton"): the fused dequant-matmul (CUDA only;
                  on a CPU the Triton interpreter runs it, for correctness, never for timing)
  ours-reference  nf4_matmul(backend="torch"): dequantize W to x's dtype, then F.linear
  bitsandbytes    bitsandbytes.matmul_4bit with the quant_state of functional.quantize_4bit
                  (where installed; it runs on a CPU too, dequantizing then F.linear)
  dense           F.linear with the full-precision W: the ceiling a 4-bit kernel aims at
  torch.compile   the dequantize + F.linear function compiled by inductor (CUDA only)

Peak memory (CUDA) is the allocator's high-water mark during one call above what was held
before it; each row's extra also has `workspace_mb`, that peak minus the outputs (y, dx), the
memory a provider needed beside its result: a full Ŵ (N·K elements, `w_full_mb`) for the
dequantizing providers, about nothing for the fused kernel. A summary (stderr) prints
ours / bitsandbytes per point; the goal is ≥ 1.3× on a GPU for M·N ≥ 4096·4096.

    ltk bench nf4                                          # CPU: 256×1024×1024, fp32
    ltk bench nf4 --device cuda                            # GPU: 4096 tokens × 4096², Llama-7B MLP
    ltk bench nf4 --device cuda --shapes 4096x4096x4096 --modes fwd --providers ours,bitsandbytes
"""
from __future__ import annotations

import importlib
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, environment, resolve_device
from ltk.bench.peaks import pct_of_peak
from ltk.bench.sweep import (
    DTYPES,
    MODES,
    Skip,
    SweepRows,
    kernel_unavailable,
    measure_point,
    parse_choices,
    parse_dtype,
    print_skipped,
    release_memory,
)
from ltk.training.hardware import peak_flops
from ltk.training.progress import progress, ticking

PROVIDERS = ("ours", "ours-reference", "bitsandbytes", "dense", "torch.compile")
BASELINE = "bitsandbytes"
BLOCKSIZE = 64
CUDA_SHAPES = ((4096, 4096, 4096), (4096, 11008, 4096), (4096, 4096, 11008))  # (M, N, K): Llama-7B q/o, up, down
CPU_SHAPES = ((256, 1024, 1024),)
GOAL = 1.3  # ours / bitsandbytes on a GPU, for M·N ≥ 4096·4096


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"4096x4096x4096,256x1kx1k" -> [(4096, 4096, 4096), (256, 1024, 1024)]: M×N×K, a k
    suffix meaning ×1024."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        dims = part.lower().split("x")
        try:
            vals = [int(d[:-1]) * 1024 if d.endswith("k") else int(d) for d in dims]
        except ValueError:
            vals = []
        if len(vals) != 3 or min(vals) < 1:
            raise ValueError(f"expected shapes like 4096x4096x4096 (M×N×K, comma separated), got {text!r}")
        out.append(tuple(vals))
    if not out:
        raise ValueError(f"expected shapes like 4096x4096x4096 (M×N×K, comma separated), got {text!r}")
    return out


def _nf4():
    """The module ltk/kernels/nf4.py (imported late: TRITON_INTERPRET must be set before it)."""
    return importlib.import_module("ltk.kernels.nf4")


def _bnb():
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


def unavailable(provider: str, dev: torch.device) -> str | None:
    """Why `provider` cannot run at all on `dev`, or None when it can."""
    return kernel_unavailable(provider, dev, {"bitsandbytes": "bitsandbytes.functional"})


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (packed, absmax) of w at BLOCKSIZE: the format every provider but dense reads."""
    return _nf4().quantize_nf4(w, BLOCKSIZE)


def build(provider: str, x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor):
    """(forward, inputs): the provider's y = x · Ŵᵀ from a fresh leaf copy of x (the only
    input that gets a gradient). `w` is the full-precision weight in x's dtype (dense, and
    bitsandbytes quantizes it itself); packed, absmax are ours (quantize(w))."""
    x = x.detach().clone().requires_grad_(True)
    shape = tuple(w.shape)
    nf4 = _nf4()
    if provider == "ours":
        return (lambda: nf4.nf4_matmul(x, packed, absmax, shape, BLOCKSIZE, backend="triton")), [x]
    if provider == "ours-reference":
        return (lambda: nf4.nf4_matmul(x, packed, absmax, shape, BLOCKSIZE, backend="torch")), [x]
    if provider == "dense":
        return (lambda: F.linear(x, w)), [x]
    if provider == "bitsandbytes":
        bnb = _bnb()
        # from the weight in the compute dtype, as Linear4bit does: its quant_state then
        # dequantizes straight to that dtype
        qw, state = bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=False,
                                                 quant_type="nf4")
        return (lambda: bnb.matmul_4bit(x, qw.t(), state)), [x]
    if provider == "torch.compile":
        def dequant_matmul(x_, packed_, absmax_):
            return F.linear(x_, nf4.dequantize_nf4(packed_, absmax_, shape, BLOCKSIZE, x_.dtype))

        torch._dynamo.reset()  # a fresh, static-shape compile per point
        compiled = torch.compile(dequant_matmul, dynamic=False)
        return (lambda: compiled(x, packed, absmax)), [x]
    raise ValueError(f"unknown provider {provider!r}")


def run(*, shapes: str | None = None, dtype: str = "auto", modes: str = "all", providers: str = "all",
        min_time: float = 0.25, device: str = "auto", seed: int = 0) -> SweepRows:
    """Time every (shape, mode, provider) point; one Row each.

    shapes: comma list of M×N×K ("4096x4096x4096,4096x11008x4096"); None = the device default
    (CUDA: 4096 tokens × 4096×4096, 11008×4096, 4096×11008; CPU: 256×1024×1024). dtype: auto
    (bf16 on CUDA, fp32 on a CPU), fp32, fp16, bf16. modes, providers: comma lists or "all".
    min_time: timed seconds per point. seed: of x and W (W ~ N(0, 0.02²), as an initialised
    or pretrained linear layer)."""
    dev, shape_list, dtype, mode_list, runnable, rows, env, peak, elem = start_sweep(
        shapes, dtype, modes, providers, device, CPU_SHAPES, CUDA_SHAPES, PROVIDERS, unavailable)
    nf4 = _nf4()  # the cost model (flops, bytes_moved) is shared by every provider

    bar = progress(total=len(shape_list) * len(mode_list) * len(runnable), desc="nf4", unit="point")
    for M, N, K in shape_list:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(M, K, generator=gen).to(dev, DTYPES[dtype])
        w = (0.02 * torch.randn(N, K, generator=gen)).to(dev, DTYPES[dtype])
        packed, absmax = quantize(w)
        shape = f"M={M},N={N},K={K}"
        for mode in mode_list:
            passes = 2 if mode == "fwd+bwd" else 1  # the backward is one more matmul of the same size
            fl = passes * nf4.flops(M, N, K)
            nbytes = passes * nf4.bytes_moved(M, N, K, dtype_bytes=elem, blocksize=BLOCKSIZE, fused=True)
            out_mb = {"fwd": M * N, "bwd": M * K, "fwd+bwd": M * N + M * K}[mode] * elem / 2**20
            for p in ticking(runnable, bar):
                result = measure_point(p, partial(build, p, x, w, packed, absmax), mode, dev, min_time,
                                       baselines=("ours-reference", "dense"))
                if isinstance(result, Skip):
                    rows.skipped.append(Skip(p, f"{shape} {mode}", result.reason))
                    continue
                timing, peak_mb = result
                extra = {"M": M, "N": N, "K": K, "blocksize": BLOCKSIZE, "flops": fl, "bytes": nbytes,
                         "bytes_unfused": passes * nf4.bytes_moved(M, N, K, dtype_bytes=elem, blocksize=BLOCKSIZE,
                                                                   fused=False),
                         "w_full_mb": N * K * elem / 2**20,
                         "workspace_mb": None if peak_mb is None else peak_mb - out_mb,
                         "peak_flops": peak, "threads": env["torch_threads"],
                         "load_avg_1m_before": env["load_avg_1m"], "baseline": BASELINE}
                if mode == "bwd":
                    extra["timed"] = "dx alone (autograd.grad on a retained graph); W is frozen"
                rows.append(matmul_row(dev, "nf4-matmul", shape, dtype, mode, p, timing, fl, nbytes, peak, peak_mb,
                                       extra))
        del x, w, packed, absmax
        release_memory(dev)
    bar.close()

    return finish(rows, BASELINE, GOAL, "M·N ≥ 4096·4096 on a GPU")


def start_sweep(shapes: str | None, dtype: str, modes: str, providers: str, device: str, cpu_shapes, cuda_shapes,
                all_providers, unavailable) -> tuple:
    """What a matmul sweep (this one, ltk/bench/lora.py) sets up before its loop: (device, shapes
    — the device's defaults when None —, dtype name, modes, the providers that can run, the
    rows with a Skip for each that cannot, the environment read before the sweep (its load
    average is that of other processes), the device's peak FLOP/s, bytes per element)."""
    dev = resolve_device(device)
    shape_list = parse_shapes(shapes) if shapes is not None else list(cuda_shapes if dev.type == "cuda" else cpu_shapes)
    dtype = parse_dtype(dtype, dev)
    mode_list = list(MODES) if modes == "all" else parse_choices(modes, MODES, "mode")
    wanted = list(all_providers) if providers == "all" else parse_choices(providers, all_providers, "provider")
    rows = SweepRows()
    skip_all = {p: why for p in wanted if (why := unavailable(p, dev))}
    rows.skipped += [Skip(p, "*", why) for p, why in skip_all.items()]
    runnable = [p for p in wanted if p not in skip_all]
    return (dev, shape_list, dtype, mode_list, runnable, rows, environment(dev), peak_flops(dev, dtype),
            DTYPES[dtype].itemsize)


def matmul_row(dev, op: str, shape: str, dtype: str, mode: str, provider: str, timing, flops: float,
               nbytes: float, peak: float | None, peak_mb: float | None, extra: dict) -> Row:
    """One timed point of a matmul sweep: TFLOP/s, GB/s and % of peak from its counts."""
    seconds = timing.median_ms * 1e-3
    return Row.stamped(dev, op=op, shape=shape, dtype=dtype, mode=mode, provider=provider,
                       median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, runs=timing.runs,
                       tflops=flops / seconds / 1e12, gbps=nbytes / seconds / 1e9,
                       pct_of_peak=pct_of_peak(flops / seconds, peak), peak_mem_mb=peak_mb,
                       extra=json.dumps(extra, sort_keys=True))


def finish(rows: SweepRows, baseline: str, goal: float, where: str) -> SweepRows:
    """The end of a sweep: speedups against `baseline`, the skips named in every row, the
    summary against the goal and the list of skips printed."""
    speedups(rows, baseline)
    for r in rows:  # every row names what did not run in the same sweep
        r.extra = json.dumps({**json.loads(r.extra), "skipped": rows.skipped_summary()}, sort_keys=True)
    print_summary(rows, "ours", baseline, goal, where)
    print_skipped(rows.skipped)
    return rows


def speedups(rows: list[Row], baseline: str) -> None:
    """speedup = baseline time / this row's time at the same shape and mode."""
    base = {(r.shape, r.mode): r.median_ms for r in rows if r.provider == baseline}
    for r in rows:
        if (r.shape, r.mode) in base:
            r.speedup = base[(r.shape, r.mode)] / r.median_ms


def print_summary(rows: list[Row], ours: str, baseline: str, goal: float, where: str, file=None) -> None:
    """Per (shape, mode): each provider's time as a ratio against `baseline` (>1: faster),
    `ours` first, and on CUDA the peak memory and the workspace beside the outputs (stderr,
    so `--json` output on stdout stays clean)."""
    file = file or sys.stderr
    points = list(dict.fromkeys((r.shape, r.mode) for r in rows))
    print(f"{baseline} time / provider time (goal for {ours}: ≥ {goal}× at {where}):", file=file)
    for shape, mode in points:
        at = [r for r in rows if (r.shape, r.mode) == (shape, mode)]
        at.sort(key=lambda r: r.provider != ours)
        for r in at:
            ratio = "—" if r.speedup is None else f"{r.speedup:.2f}×"
            mem = ""
            if r.peak_mem_mb is not None:
                ws = json.loads(r.extra).get("workspace_mb")
                mem = f"  peak {r.peak_mem_mb:8.1f} MiB" + ("" if ws is None else f", beside outputs {ws:8.1f} MiB")
            print(f"  {shape:24s} {mode:8s} {r.provider:15s} {r.median_ms:9.3f} ms  {ratio:>7s}{mem}", file=file)
    if not any(r.provider == ours for r in rows):
        print(f"  ({ours} did not run here: see the skipped providers)", file=file)
    if not any(r.provider == baseline for r in rows):
        print(f"  ({baseline} did not run here: no ratios)", file=file)
