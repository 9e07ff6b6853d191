"""Timing and result rows: every number this project publishes goes through this file.

A benchmark number is only worth keeping with its provenance (what ran, on which machine,
at which commit, with which library versions) and its spread (one median hides noise).
So a measurement is a `Timing` (median, p20, p80 over many runs) and a published result is
a `Row` of the long-format CSV below, one row per (op, shape, dtype, mode, provider):

    op, shape, dtype, mode, provider,          what ran        ("train-step", "B=8,T=128", ...)
    median_ms, p20_ms, p80_ms, runs,           how long         (quantiles over the timed runs)
    throughput, throughput_unit, tflops, gbps, how fast         (tokens/s, TFLOP/s, GB/s)
    pct_of_peak, speedup, peak_mem_mb,         against what     (datasheet peak, baseline)
    device, commit, torch, triton, date,       provenance
    extra                                      free-form JSON   (settings, checks)

Long format (one measurement per row, not one column per provider) is what Liger-Kernel's
benchmark CSV uses: new providers or shapes add rows, never columns, so files from
different runs and machines concatenate, and plots group by any column.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import platform
import subprocess
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Quantiles of the time of one call, in milliseconds, over `runs` timed calls.

    `samples_ms` keeps the raw samples (one per run on CUDA, one per block of runs on CPU)
    so timings of the same function from several rounds can be pooled (`merge`)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, samples_ms: list[float], runs: int | None = None) -> "Timing":
        if not samples_ms:
            raise ValueError("a Timing needs at least one sample")
        t = torch.tensor(samples_ms, dtype=torch.float64)
        # linear interpolation between order statistics, as triton.testing.do_bench does
        q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
        return cls(q[0], q[1], q[2], runs if runs is not None else len(samples_ms), tuple(samples_ms))

    def merge(self, other: "Timing") -> "Timing":
        """Pool the samples of two timings of the same function (e.g. two rounds)."""
        return Timing.from_samples(list(self.samples_ms + other.samples_ms), self.runs + other.runs)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" means the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def time_fn(
    fn: Callable[[], object],
    *,
    device: str | torch.device = "auto",
    warmup: float = 0.1,
    min_time: float = 1.0,
) -> Timing:
    """Time `fn()` on `device`; `warmup` and `min_time` are in seconds.

    CUDA: kernels are queued asynchronously, so a wall clock around `fn()` measures the
    launch, not the work. `triton.testing.do_bench` records CUDA events around each call,
    synchronizes once at the end, and flushes the L2 cache between calls (so every call
    starts cold, as it would inside a real model, not from data left by the last call).

    CPU: the work is done when `fn()` returns, so a wall clock is right, but the first calls
    pay one-off costs (allocations, optimizer state, lazy initialization); we call `fn` for
    `warmup` seconds first. `torch.utils.benchmark.Timer.blocked_autorange` then groups the
    calls into blocks long enough that the timer's own overhead is negligible and times
    blocks until `min_time` has passed; quantiles are taken over the per-call time of each
    block. Its `num_threads` defaults to 1, so we pass the current thread count: a
    single-threaded number would not be the one a user of this machine sees.
    """
    device = resolve_device(device)
    if device.type == "cuda":
        import triton.testing

        ms = dict(warmup=max(1, int(warmup * 1e3)), rep=max(1, int(min_time * 1e3)))
        with torch.cuda.device(device):  # do_bench times on the current device
            try:  # the raw samples give the number of runs, and let rounds be pooled
                samples = triton.testing.do_bench(fn, return_mode="all", **ms)
                return Timing.from_samples(list(samples))
            except AssertionError:  # older Triton: no "all"; quantiles only, run count unknown
                med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], **ms)
                return Timing(med, p20, p80, runs=0, samples_ms=(med,))
    if device.type != "cpu":
        raise ValueError(f"time_fn supports cuda and cpu devices, got {device}")
    from torch.utils import benchmark

    deadline = time.perf_counter() + warmup
    fn()
    while time.perf_counter() < deadline:
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time)
    return Timing.from_samples([t * 1e3 for t in m.times], runs=len(m.times) * m.number_per_run)


@dataclass
class Row:
    """One measurement of the long-format results CSV (schema in the module docstring).

    `throughput` is the figure of merit in `throughput_unit` (e.g. tokens/s); `tflops` and
    `gbps` are achieved rates where the FLOPs or bytes are known; `pct_of_peak` compares
    them with the device's datasheet peak (ltk/bench/peaks.py), None where no peak is known;
    `speedup` is this row's throughput over the baseline provider's in the same run.
    `peak_mem_mb` is CUDA's allocator high-water mark; None on a CPU (see train_step.py)."""

    op: str
    shape: str
    dtype: str
    mode: str  # fwd | bwd | fwd+bwd | step
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    throughput: float | None = None
    throughput_unit: str = ""
    tflops: float | None = None
    gbps: float | None = None
    pct_of_peak: float | None = None
    speedup: float | None = None
    peak_mem_mb: float | None = None
    device: str = ""
    commit: str = ""
    torch: str = ""
    triton: str = ""
    date: str = ""
    extra: str = "{}"  # JSON object: settings and checks specific to the benchmark

    @classmethod
    def stamped(cls, device: str | torch.device, **fields) -> "Row":
        """A row stamped with `device`'s name, the commit, versions and the current date."""
        env = environment(device)
        stamp = {k: env[k] for k in ("device", "commit", "torch", "triton", "date")}
        return cls(**{**stamp, **fields})


COLUMNS = [f.name for f in dataclasses.fields(Row)]


def write_csv(rows: list[Row], path: str | os.PathLike) -> None:
    """Append `rows` to the CSV at `path`, writing the header only when the file is new.

    Appending to a file written with a different column list raises: mixing schemas
    in one file would silently shift columns."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {COLUMNS}; write to a new file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(row).items()})


def read_csv(path: str | os.PathLike) -> list[Row]:
    """Read rows written by `write_csv` back, with their types (empty cells become None)."""
    hints = typing.get_type_hints(Row)
    out = []
    with Path(path).open(newline="") as f:
        for rec in csv.DictReader(f):
            out.append(Row(**{k: _parse(v, hints[k]) for k, v in rec.items()}))
    return out


def _parse(text: str, t) -> object:
    args = typing.get_args(t)
    if args and type(None) in args:  # Optional[X]
        if text == "":
            return None
        t = next(a for a in args if a is not type(None))
    return t(text) if t in (int, float) else text


def rows_to_markdown(rows: list[Row]) -> str:
    """A Markdown table of `rows`, with only the columns some row fills, and the
    provenance (device, commit, versions, date) once underneath when all rows share it."""
    if not rows:
        return "(no rows)"
    cols: list[tuple[str, Callable[[Row], object]]] = [
        ("op", lambda r: r.op), ("shape", lambda r: r.shape), ("dtype", lambda r: r.dtype),
        ("mode", lambda r: r.mode), ("provider", lambda r: r.provider),
        ("median ms [p20, p80]", lambda r: f"{_fmt(r.median_ms)} [{_fmt(r.p20_ms)}, {_fmt(r.p80_ms)}]"),
        ("throughput", lambda r: None if r.throughput is None else f"{_fmt(r.throughput)} {r.throughput_unit}"),
        ("TFLOP/s", lambda r: r.tflops), ("GB/s", lambda r: r.gbps),
        ("% of peak", lambda r: r.pct_of_peak), ("speedup", lambda r: r.speedup),
        ("peak MB", lambda r: r.peak_mem_mb),
    ]
    cols = [(name, get) for name, get in cols if any(get(r) is not None for r in rows)]
    lines = ["| " + " | ".join(name for name, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(get(r)) for _, get in cols) + " |")
    stamps = {(r.device, r.commit, r.torch, r.triton) for r in rows}
    if len(stamps) == 1:
        dev, commit, tv, trv = stamps.pop()
        lines.append(f"\n{dev} · commit {commit} · torch {tv} · triton {trv} · {rows[0].date}")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment(device: str | torch.device = "auto") -> dict:
    """Where a number was measured: device name, cores, library versions, commit, date, and
    the 1-minute load average (other processes on a CPU slow a benchmark down; a number
    measured on a busy machine should say so; read it before the benchmark, which adds
    its own threads to it)."""
    device = resolve_device(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {**_static_environment(device.type, device.index), "torch_threads": torch.get_num_threads(),
            "date": _iso_now(), "load_avg_1m": load}


@functools.lru_cache(maxsize=None)
def _static_environment(device_type: str, index: int | None) -> dict:
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index)
    else:
        name = _cpu_name()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": name,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def _cpu_name() -> str:
    """The CPU model as the kernel reports it; `platform` is the fallback off Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it; "unknown"
    outside a checkout of this project (e.g. installed from a wheel into some other repo)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        if not (Path(git("rev-parse", "--show-toplevel")) / "ltk" / "bench" / "harness.py").exists():
            return "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def rows_to_json(rows: list[Row]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in rows], indent=2)
