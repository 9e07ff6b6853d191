"""The sweep of a memory-bound op (ltk/bench/swiglu.py, ltk/bench/rope.py): for every point, mode and
provider one `Row` with the time, the GB/s the op's cost model says it must move, and that as a
fraction of the copy bandwidth measured on the same device.

An elementwise op does a few FLOPs per element against the bytes of its tensors, far below the
~300 FLOPs per byte an H100 can do in the time it loads one (989 TFLOP/s over 3.35 TB/s): the time
is the bytes. GB/s = `bytes_moved(...)` / time, the least traffic the op needs (each input read
once, each output written once), charged to every provider alike, so a provider that moves more
(eager PyTorch's intermediates) shows as fewer GB/s. `dst.copy_(src)` reads and writes each byte
once, like these ops, so the copy bandwidth measured once per run (ltk/bench/peaks.py) is the
practical ceiling: `pct_of_copy` in each row's extra, printed in a table after the run (as
ltk/bench/norms.py does). On a CPU a working set that fits in the caches can pass 100%.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ltk.bench.harness import Row, environment
from ltk.bench.norms import finish_bandwidth_rows
from ltk.bench.peaks import measure_peaks, pct_of_peak, peak_for
from ltk.bench.sweep import Skip, SweepRows, measure_point, release_memory
from ltk.training.progress import progress, ticking


@dataclass
class Point:
    """One size of the sweep: its label, the plotted x, the input tensors, and the cost model."""

    shape: str                                  # e.g. "rows=4096,cols=14336"
    x: float                                    # the plot's x
    tensors: dict                               # what `build` makes each provider's call from
    nbytes: Callable[[str], int]                # mode -> bytes the op must move
    nflops: Callable[[str], int]                # mode -> FLOPs
    extra: dict = field(default_factory=dict)   # the point's settings, for each row's extra


def run_sweep(op: str, points: Sequence[Callable[[], Point]], providers: Sequence[str],
              unavailable: Callable[[str], str | None], build: Callable[[str, dict], tuple], *, dev: torch.device,
              dtype: str, modes: Sequence[str], min_time: float, copy_mib: int | None, baselines: Sequence[str],
              baseline: str, xlabel: str, plot: str | None = None,
              skip_mode: Callable[[str, str], str | None] = lambda provider, mode: None) -> SweepRows:
    """Time `build(provider, point.tensors)` -> (forward, inputs) for every point × mode × provider.

    unavailable(provider): why it cannot run at all here (a Skip for every point), or None;
    skip_mode(provider, mode): why it does not run in that mode, or None; baselines: providers
    whose failure is a bug (raised), the others' a Skip; baseline: the provider `speedup` divides by."""
    out = SweepRows()
    skip_all = {p: why for p in providers if (why := unavailable(p))}
    out.skipped += [Skip(p, "*", why) for p, why in skip_all.items()]
    runnable = [p for p in providers if p not in skip_all]
    env = environment(dev)  # read first: its load average is that of other processes
    copy_gbps = measure_peaks(dev, copy_mib=copy_mib, matmul_n=64, min_time=max(0.05, min_time))["copy_gbps"]
    datasheet = peak_for(env["device"]) if dev.type == "cuda" else None
    bar = progress(total=len(points) * len(modes) * len(runnable), desc=op, unit="point")
    for make_point in points:
        point = make_point()
        for mode in modes:
            for p in ticking(runnable, bar):
                why = skip_mode(p, mode)
                make = lambda p=p, tensors=point.tensors: build(p, tensors)  # noqa: E731
                result = Skip(p, "", why) if why else measure_point(p, make, mode, dev, min_time, baselines=baselines)
                if isinstance(result, Skip):
                    out.skipped.append(Skip(p, f"{point.shape} {mode}", result.reason))
                    continue
                timing, peak_mb = result
                nbytes, fl = point.nbytes(mode), point.nflops(mode)
                seconds = timing.median_ms * 1e-3
                gbps = nbytes / seconds / 1e9
                extra = {**point.extra, "x": point.x, "bytes": nbytes, "flops": fl, "copy_gbps": copy_gbps,
                         "pct_of_copy": 100 * gbps / copy_gbps, "baseline": baseline,
                         "datasheet": None if datasheet is None else datasheet.name,
                         "threads": env["torch_threads"], "load_avg_1m_before": env["load_avg_1m"]}
                out.append(Row.stamped(
                    dev, op=op, shape=point.shape, dtype=dtype, mode=mode, provider=p,
                    median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, runs=timing.runs,
                    tflops=fl / seconds / 1e12, gbps=gbps,
                    pct_of_peak=pct_of_peak(gbps, datasheet and datasheet.hbm_gbps),
                    peak_mem_mb=peak_mb, extra=json.dumps(extra, sort_keys=True)))
        point = make = None  # the point's tensors go before the next point's are made
        release_memory(dev)
    bar.close()

    return finish_bandwidth_rows(out, baseline, copy_gbps, plot, x_key="x", xlabel=xlabel, title=op)
