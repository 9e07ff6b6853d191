"""What the kernel benchmarks (ltk/bench/attention.py, ltk/bench/norms.py) share: sweeps over sizes,
providers that may be skipped, the three timed modes, CUDA peak memory, and the plot.

A kernel benchmark is a sweep: for every size (sequence length, hidden size), every mode
and every provider it times one call and writes one `Row`. Three things make that harder
than a loop:

1. **Providers that cannot run here.** flash-attn is not installed, our Triton kernels need
   CUDA (the Triton interpreter runs them on a CPU, but one program after another in Python:
   right for correctness, meaningless for timing), an eager attention would not fit the
   T×S scores in memory. Such a provider is *skipped*, never silently: each skip is a `Skip`
   (provider, point, reason), collected in `SweepRows.skipped` beside the rows and printed.
2. **Out of memory on one point must not kill the sweep.** The call is tried; an
   out-of-memory error (CUDA's `torch.OutOfMemoryError`, or the CPU allocator's
   RuntimeError) becomes a `Skip` and the sweep goes on.
3. **The three modes need different timed regions** (see `timed_call`).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ltk.bench.harness import time_fn

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


NEEDS_CUDA = "ours needs CUDA: the Triton interpreter is for correctness, not timing"


def kernel_unavailable(provider: str, dev: torch.device, libraries: dict[str, str] | None = None) -> str | None:
    """The reasons the kernel sweeps share: our Triton kernel is timed on CUDA only (the
    interpreter runs it one program at a time), and so is torch.compile (on a CPU each
    point's C++ compile outlasts the sweep); a baseline in `libraries` ({provider: module})
    needs its module importable. None when `provider` can run on `dev`."""
    if libraries and provider in libraries:
        try:
            importlib.import_module(libraries[provider])
        except ImportError:
            return f"{libraries[provider].split('.')[0]} not installed"
    if provider == "ours":
        from ltk.kernels.backend import HAS_TRITON

        if not HAS_TRITON:
            return "ours needs the triton package"
        if dev.type != "cuda":
            return NEEDS_CUDA
    if provider == "torch.compile" and dev.type != "cuda":
        return "torch.compile is timed on CUDA only (on a CPU each point's C++ compile outlasts the sweep)"
    return None


@dataclass(frozen=True)
class Skip:
    """A provider that did not run at one point of the sweep, and why."""

    provider: str
    point: str  # the shape and mode, e.g. "B=2,H=8,T=1024,D=64 fwd"; "*" for every point
    reason: str


class SweepRows(list):
    """The rows of a sweep (a plain list of `Row`s to every caller) with `.skipped`, the
    providers that did not run, so a caller can show or test them."""

    def __init__(self, rows: Iterable = (), skipped: Iterable[Skip] = ()):
        super().__init__(rows)
        self.skipped: list[Skip] = list(skipped)

    def skipped_summary(self) -> dict[str, str]:
        """{provider: reason}, the first reason given for each skipped provider."""
        out: dict[str, str] = {}
        for s in self.skipped:
            out.setdefault(s.provider, s.reason)
        return out


# --- options ------------------------------------------------------------------------------

def parse_sizes(text: str | int | Sequence[int]) -> list[int]:
    """"512,1k,2k" -> [512, 1024, 2048]; an int or a list of ints passes through."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return [int(v) for v in text]
    out = []
    try:
        for part in text.replace(" ", "").split(","):
            if part:
                scale = 1024 if part[-1] in "kK" else 1
                out.append(int(part.rstrip("kK")) * scale)
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"expected a comma-separated list of positive sizes like 512,1k,2k, got {text!r}")
    return out


def parse_choices(text: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """"fwd,bwd" -> ["fwd", "bwd"], refusing names not in `allowed` (a typo must not silently
    drop a provider or a mode)."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    items = [s for s in items if s]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def parse_dtype(dtype: str, device: torch.device) -> str:
    """"auto" is bf16 on CUDA (what training uses) and fp32 on a CPU (whose bf16 matmuls are
    emulated on most CPUs and would measure the emulation)."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


# --- memory -------------------------------------------------------------------------------

def available_bytes(device: torch.device) -> int | None:
    """Memory a new tensor can still get on `device` (ltk/models/sizing.py: CUDA's free memory, or
    the host's available memory within a container's limit); None where it cannot be read."""
    from ltk.models.sizing import available_bytes as free_bytes

    try:
        return free_bytes(device)
    except (OSError, KeyError, ValueError):
        return None


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error on CUDA or from the CPU allocator."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def failure(err: BaseException) -> str:
    """A one-line reason for a skipped point: the error's type and first line."""
    lines = str(err).strip().splitlines()
    return f"failed: {type(err).__name__}" + (f": {lines[0][:160]}" if lines else "")


def release_memory(device: torch.device, collect: bool = False) -> None:
    """Give the memory of the last provider back before the next one is measured: CUDA's
    caching allocator keeps freed blocks, so hand them back. `collect` also runs the garbage
    collector, needed after an error (its traceback holds the failed call's tensors) but too
    slow (~0.1 s) to run after every point; tensors are otherwise freed by reference count."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """The most memory one call of `fn` allocated above what was allocated before it, in MiB:
    the allocator's high-water mark after a reset, minus the allocation at the start (the
    inputs, and for the backward mode the forward's saved tensors, are not counted)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


# --- the timed call of each mode ----------------------------------------------------------

def timed_call(forward: Callable[[], torch.Tensor | tuple], inputs: Sequence[torch.Tensor], mode: str,
               seed: int = 0) -> Callable[[], object]:
    """The function to time for `mode`, given `forward()` that computes the op from `inputs`
    (tensors with requires_grad=True).

    fwd      forward under torch.no_grad(): the inference cost, nothing saved for backward.
    bwd      the backward alone. The forward runs once here, outside the timed region; each
             timed call is torch.autograd.grad(out, inputs, dout, retain_graph=True), which
             walks the same graph again (retain_graph keeps its saved tensors alive) and
             returns fresh gradients instead of accumulating into .grad (no extra add).
             This is how FlashAttention's own benchmark times the backward. The other honest
             way, time(fwd+bwd) − time(fwd), subtracts two noisy numbers, and its forward
             half would be the no-grad forward, which saves less than a training forward.
    fwd+bwd  a training step's share: forward with autograd, then the backward.
    The upstream gradient dout is a fixed random tensor (seeded), as a real loss would give, laid
    out like its output (a transposed view's gradient is the same transposed view).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return forward()
        return fwd

    def upstream(out) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = list(out) if isinstance(out, tuple) else [out]
        gen = torch.Generator(device=outs[0].device).manual_seed(seed)
        # in each output's layout (empty_like keeps dense strides), as the next op's backward would
        # hand it: a provider that copies a gradient to its own layout pays for it only where it must
        return outs, [torch.empty_like(o).normal_(generator=gen) for o in outs]

    if mode == "bwd":
        outs, douts = upstream(forward())

        def bwd():
            return torch.autograd.grad(outs, inputs, douts, retain_graph=True)
        return bwd

    _, douts = upstream(forward())

    def fwd_bwd():
        out = forward()
        outs = list(out) if isinstance(out, tuple) else [out]
        return torch.autograd.grad(outs, inputs, douts)
    return fwd_bwd


# --- output ---------------------------------------------------------------------------------

def measure_point(provider: str, make: Callable[[], tuple], mode: str, device: torch.device, min_time: float,
                  baselines: Sequence[str]):
    """Time one (provider, point): `make()` -> (forward, inputs). Returns (Timing, peak MiB or
    None), or a Skip when it ran out of memory or when an optional provider (not one of the
    `baselines`, whose failure is a bug) failed. torch.compile's bwd mode runs with inductor's
    buffer donation off: donated forward buffers forbid the retained graph the timed
    backward re-walks (the same kernels, without reusing those buffers)."""
    call, failed = None, False
    try:
        no_donation = provider == "torch.compile" and mode == "bwd"
        with torch._functorch.config.patch(donated_buffer=False) if no_donation else contextlib.nullcontext():
            forward, inputs = make()
            call = timed_call(forward, inputs, mode)
            timing = time_fn(call, device=device, warmup=min(0.1, min_time), min_time=min_time)
            peak_mb = cuda_peak_mb(call, device) if device.type == "cuda" else None
        return timing, peak_mb
    except Exception as e:  # noqa: BLE001 - one point's failure is a result, not the end of the sweep
        failed = True
        if is_oom(e):
            return Skip(provider, "", "out of memory")
        if provider in baselines:
            raise
        return Skip(provider, "", failure(e))
    finally:  # after an error, collect: the traceback's frames held the failed call's tensors
        del call
        release_memory(device, collect=failed)


def print_skipped(skipped: Sequence[Skip], file=None) -> None:
    """One line per (provider, reason), with how many points it covers (to stderr, so
    `--json` output on stdout stays clean)."""
    file = file or sys.stderr
    if not skipped:
        return
    groups: dict[tuple[str, str], list[str]] = {}
    for s in skipped:
        groups.setdefault((s.provider, s.reason), []).append(s.point)
    print("skipped providers:", file=file)
    for (provider, reason), points in groups.items():
        where = "all points" if points == ["*"] else (points[0] if len(points) == 1 else f"{len(points)} points")
        print(f"  {provider:14s} {reason} ({where})", file=file)


def plot_sweep(rows: Sequence, path: str | Path, *, x: Callable, y: Callable, series: Callable,
               xlabel: str, ylabel: str, title: str, hline: tuple[float, str] | None = None) -> Path:
    """One panel per mode, one line per series ("provider" or "provider variant", the variant
    dashed in the provider's colour), y(row) against x(row), on a log2 x axis since the sweeps
    double their sizes; `hline` = (value, label) draws a limit (e.g. the measured copy
    bandwidth). Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    colours: dict[str, str] = {}
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(5 * max(1, len(modes)), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.mode == mode and y(r) is not None:
                lines.setdefault(series(r), []).append((x(r), y(r)))
        for name, pts in sorted(lines.items()):
            pts.sort()
            provider, _, variant = name.partition(" ")  # one colour per provider, dashed variants
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if variant else "-",
                    color=colours.setdefault(provider, f"C{len(colours)}"), label=name)
        if hline is not None:
            ax.axhline(hline[0], color="gray", ls="--", label=hline[1])
        ax.set_xscale("log", base=2)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}: {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if rows:
        fig.suptitle(f"{rows[0].device} · {rows[0].dtype}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
