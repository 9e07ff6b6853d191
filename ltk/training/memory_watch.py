"""Each rank's memory over a run, by phase: the peak of every phase for summary.json, and with
`--trainer.memory_trace true` a timeline of samples, memory/rank{r}.jsonl in the run folder.

What is measured:

    CPU   the resident set size (RSS) of the process: /proc/self/statm for a sample, and the
          kernel's own high-water mark VmHWM (/proc/self/status) for a peak, which no sampling
          interval can miss. At every phase boundary VmHWM is read and reset to the current RSS
          (writing "5" to /proc/self/clear_refs, Linux >= 4.0), so each phase has its exact peak.
    CUDA  torch.cuda.memory_allocated for a sample and torch.cuda.max_memory_allocated for a
          peak, reset at every boundary (torch.cuda.reset_peak_memory_stats).

The baseline. On a CPU, RSS includes the interpreter and the torch libraries, several hundred MB
before anything of the run exists. The baseline is the RSS when this module was first imported
(ltk/training/trainer.py imports it: under `ltk train` that is after torch is loaded, before the
data is prepared and the model is built; `mark_baseline()` takes it again). `peak - baseline` is
what the plan's per-rank figure (model states + activations, ltk/parallel/plan.py) is to be
compared with. On CUDA the baseline is 0: the allocator counts only tensors.

Phases, as the trainer marks them:

    init   from the process start (or the last run's end in this process) to the start of
           fit(): data, model build, engine build; its peak only (the trace starts after it)
    train  the training steps and the logging between them
    eval   Trainer.evaluate
    save   Trainer.save

A trace file holds one JSON object a line: {"t": unix time, "bytes": B, "phase": P} for a sample,
{"t", "peak", "phase", "mark": "end"} where a phase ends (its exact peak since it began), and
first {"t", "bytes", "phase": "init", "mark": "baseline"}. It is flushed about once a second,
so a run killed for memory leaves its trace up to then (ltk/bench/parallel_memory.py reads it).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

PHASES = ("init", "train", "eval", "save")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.M)


def rss_bytes() -> int:
    """This process's resident set size now (/proc/self/statm: its second field, in pages)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the peak so far is the best figure there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's RSS (VmHWM) since it started or was reset."""
    try:
        with open("/proc/self/status") as f:
            return int(_HWM.search(f.read())[1]) * 1024
    except (OSError, TypeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (then a phase's
    peak is the largest sample, and the peaks of later phases include earlier ones)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_BASELINE = (time.time(), rss_bytes())


def mark_baseline() -> tuple[float, int]:
    """Take the CPU baseline (time, RSS) now: call it before a run builds its model."""
    global _BASELINE
    _BASELINE = (time.time(), rss_bytes())
    return _BASELINE


class MemoryWatch:
    """One rank's memory by phase over a run (module docstring).

        watch = MemoryWatch(device, rank, folder, trace=True)
        watch.start()                       # ends "init", begins "train"
        with watch.phase("eval"): ...       # back to "train" after
        watch.stop()
        watch.result()                      # this rank's figures, JSON-ready
        watch.gather(world)                 # collective: every rank's, on rank 0
    """

    def __init__(self, device: torch.device | str = "cpu", rank: int = 0, folder: str | Path | None = None, *,
                 trace: bool = False, interval_s: float = 0.025):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rank, self.trace, self.interval_s = rank, trace, interval_s
        self.path = Path(folder) / "memory" / f"rank{rank}.jsonl" if trace and folder is not None else None
        self.peaks: dict[str, int] = {}
        self.current = "init"
        self.exact = True  # False once a peak could not be reset (then phases are sampled maxima)
        self._sampled = 0  # the largest sample of the current phase
        self._lock = threading.Lock()
        self._rows: list[dict] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._file = None
        self.baseline = (time.time(), 0) if self.cuda else _BASELINE

    # -- reading the device ------------------------------------------------------------------
    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes()

    def _peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_peak_rss():
            self.exact = False

    # -- phases ------------------------------------------------------------------------------
    def _end_phase(self) -> None:
        """Close the current phase: its peak (the device's high-water mark, or the largest sample
        where it cannot be reset), then reset the mark for the next phase."""
        with self._lock:
            peak = self._peak() if self.exact else max(self._sampled, self._now())
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
            self._row({"t": time.time(), "peak": peak, "phase": self.current, "mark": "end"})
            self._reset()
            self._sampled = 0

    def _begin(self, name: str) -> None:
        with self._lock:
            self.current = name

    def start(self) -> "MemoryWatch":
        """End "init" (its peak: everything since the process started) and begin "train"."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w")
            t, b = self.baseline
            self._row({"t": t, "bytes": b, "phase": "init", "mark": "baseline"})
        self._end_phase()
        self._begin("train")
        if self.trace:
            self._thread = threading.Thread(target=self._sample, name=f"memory-trace-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark what runs inside as phase `name` (eval, save), then return to the phase before."""
        if name not in PHASES:
            raise ValueError(f"unknown memory phase {name!r}; phases: {', '.join(PHASES)}")
        before = self.current
        self._end_phase()
        self._begin(name)
        try:
            yield
        finally:
            self._end_phase()
            self._begin(before)

    def stop(self) -> None:
        """End the current phase and the sampler; close the trace file. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._end_phase()
        if self._file is not None:
            self._flush()
            self._file.close()
            self._file = None

    # -- the trace -----------------------------------------------------------------------------
    def _sample(self) -> None:
        last_flush = time.monotonic()
        while not self._stop.wait(self.interval_s):
            with self._lock:
                b = self._now()
                self._sampled = max(self._sampled, b)
                self._row({"t": time.time(), "bytes": b, "phase": self.current})
            if time.monotonic() - last_flush > 1.0:
                with self._lock:
                    self._flush()
                last_flush = time.monotonic()

    def _row(self, row: dict) -> None:
        if self._file is not None:
            self._rows.append(row)

    def _flush(self) -> None:
        if self._file is not None and self._rows:
            self._file.write("".join(json.dumps(r) + "\n" for r in self._rows))
            self._file.flush()
            self._rows = []

    # -- results -------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        """This rank's figures: baseline, peak, peak above the baseline, the peak of each phase."""
        base = self.baseline[1]
        peak = max(self.peaks.values(), default=0)
        return {"rank": self.rank, "measure": "cuda_max_allocated" if self.cuda else "rss", "baseline": base,
                "peak": peak, "peak_above_baseline": peak - base, "phases": dict(self.peaks),
                "exact_phase_peaks": self.exact}

    def gather(self, world: int) -> list[dict[str, Any]] | None:
        """Collective where world > 1: every rank's result() on rank 0 (None on the others)."""
        mine = self.result()
        if world == 1:
            return [mine]
        import torch.distributed as dist

        out = [None] * world if self.rank == 0 else None
        dist.gather_object(mine, out, dst=0)
        return out


def read_trace(path: str | Path) -> dict[str, Any]:
    """One rank's trace file: {"baseline": (t, bytes), "samples": [(t, bytes, phase)], "ends":
    [(t, peak, phase)]}; a last line cut short by a kill is skipped."""
    out: dict[str, Any] = {"baseline": None, "samples": [], "ends": []}
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("mark") == "baseline":
            out["baseline"] = (r["t"], r["bytes"])
        elif r.get("mark") == "end":
            out["ends"].append((r["t"], r["peak"], r["phase"]))
        else:
            out["samples"].append((r["t"], r["bytes"], r["phase"]))
    return out


def trace_peaks(trace: dict[str, Any]) -> dict[str, int]:
    """Peak bytes per phase from a trace: the exact peaks at the phase ends, and for a phase
    still running when the trace stopped (a killed run) the largest sample since its last end."""
    peaks: dict[str, int] = {}
    for _, peak, phase in trace["ends"]:
        peaks[phase] = max(peaks.get(phase, 0), peak)
    last_end = trace["ends"][-1][0] if trace["ends"] else -1.0
    for t, b, phase in trace["samples"]:
        if t > last_end:
            peaks[phase] = max(peaks.get(phase, 0), b)
    return peaks
