"""Where a training step spends its time and its memory: GPU counters sampled in the
background, a torch.profiler trace of a few steps, and the bytes of the step by category.

    ltk train --preset gpt-debug --max-steps 20 --profile     # CPU: trace + memory by category
    ltk train --preset gpt2-124m --device cuda --profile      # GPU: + NVML counters, memory snapshot

The run folder then holds

    summary.json                 "memory" (every run), "profile" and "nvml" (with --profile)
    profile/trace.json           Chrome trace format: open in https://ui.perfetto.dev or chrome://tracing
    profile/top_ops.txt          operators by self CPU time (and self CUDA time on a GPU)
    profile/memory_snapshot.pickle   CUDA only: drag into https://pytorch.org/memory_viz
    profile/nvml.json            per-GPU utilization, memory, power, SM clock every 50 ms

The memory by category (every run, ltk/training/memory.py) and the GPU counters (ltk/training/nvml.py)
go into the same summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ltk.training.nvml import NVMLSampler


# -- torch.profiler over a window of steps ---------------------------------------------------------
def profile_window(steps_left: int, active: int) -> tuple[int, int, int]:
    """(wait, warmup, active) steps for torch.profiler's schedule. The first step is skipped
    (lazy allocations: Adam's moments, cuBLAS workspaces, torch.compile), the second warms the
    profiler up (its own start-up cost would otherwise land in the first recorded step), then
    `active` steps are recorded. A run with fewer steps left shrinks the window: it records
    at least one step whenever one is left."""
    if isinstance(active, bool) or not isinstance(active, int) or active < 1:
        raise ValueError(f"the number of profiled steps (trainer.profile_steps) must be a positive int, got {active!r}")
    if steps_left <= 0:
        return 0, 0, 0
    if steps_left >= 2 + active:
        return 1, 1, active
    wait = 1 if steps_left >= 3 else 0
    warmup = 1 if steps_left >= 2 else 0
    return wait, warmup, steps_left - wait - warmup


class StepProfiler:
    """torch.profiler.profile over a window of training steps (see `profile_window`): CPU and,
    on CUDA, CUDA activities; shapes and memory recorded, Python stacks off (they multiply the
    trace size and the overhead). When the window closes it writes

        trace.json            Chrome trace format, uncompressed JSON ("traceEvents")
        top_ops.txt           key_averages() sorted by self CPU time (and by self CUDA time)
        memory_snapshot.pickle   CUDA only: the allocator's history from start() to the end of
                              the window (torch.cuda.memory._record_memory_history)

    Call start() before the first step, step() after each, stop() at the end (idempotent)."""

    def __init__(self, out_dir: str | Path, device: torch.device, *, active: int = 3, steps_left: int | None = None,
                 first_step: int = 0):
        self.out_dir, self.device = Path(out_dir), torch.device(device)
        self.wait, self.warmup, self.active = profile_window(active + 2 if steps_left is None else steps_left, active)
        self.first_step = first_step  # optimizer steps done before start(): the window's numbering
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.info: dict[str, Any] = {}
        self._prof: torch.profiler.profile | None = None
        self._recording_memory = False
        self._calls, self._stopping = 0, False  # step() calls so far; in stop()

    def start(self) -> None:
        if self.active == 0:
            self.info = {"trace": None, "reason": "no steps left to profile"}
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            try:  # bounded: ~100k allocator events
                torch.cuda.memory._record_memory_history(max_entries=100_000)
                self._recording_memory = True
            except Exception as e:  # older torch or a build without the allocator history
                self.info["memory_snapshot"] = f"not recorded: {type(e).__name__}: {e}"
        else:
            self.info["memory_snapshot"] = "not recorded: the allocator snapshot is CUDA-only"
        first = self.first_step + self.wait + self.warmup + 1  # 1-based numbers of the steps recorded
        self.info.update(steps=[first, first + self.active - 1],
                         schedule={"wait": self.wait, "warmup": self.warmup, "active": self.active})
        self._prof = torch.profiler.profile(
            activities=acts, schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active,
                                                              repeat=1),
            on_trace_ready=self._write, record_shapes=True, profile_memory=True, with_stack=False)
        self._prof.start()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()
            self._calls += 1

    def _write(self, prof: torch.profiler.profile) -> None:
        trace = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        first = self.first_step + self.wait + self.warmup + 1
        done = self._calls if self._stopping else self._calls + 1  # inside step(): the step just finished counts
        last = max(first, self.first_step + min(done, self.wait + self.warmup + self.active))  # >= 1 step, maybe part
        self.info["steps"] = [first, last]
        events = prof.key_averages()
        text = [f"steps {first}..{last} of the run, device {self.device}\n"]
        # self_device_time_total since torch 2.4 (self_cuda_time_total before)
        sorts = [("self CUDA time", ("self_device_time_total", "self_cuda_time_total"))] if self.cuda else []
        for title, keys in [*sorts, ("self CPU time", ("self_cpu_time_total",))]:
            for key in keys:
                try:
                    text.append(f"\n== by {title} ==\n{events.table(sort_by=key, row_limit=30)}\n")
                    break
                except (AttributeError, KeyError):
                    continue
        top = self.out_dir / "top_ops.txt"
        top.write_text("".join(text))
        self.info.update(trace=str(trace), top_ops=str(top))
        self._dump_memory()

    def _dump_memory(self) -> None:
        if not self._recording_memory:
            return
        path = self.out_dir / "memory_snapshot.pickle"
        try:
            torch.cuda.memory._dump_snapshot(str(path))
            self.info["memory_snapshot"] = str(path)
        except Exception as e:
            self.info["memory_snapshot"] = f"not written: {type(e).__name__}: {e}"
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False

    def stop(self) -> dict[str, Any]:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            self._stopping = True
            prof.stop()  # mid-window: writes what the active steps recorded so far
        self._dump_memory()
        if self.active and "trace" not in self.info:
            self.info.update(trace=None, reason="the run ended before the recorded steps")
        return self.info


# -- what `ltk train --profile` runs ---------------------------------------------------------------
class RunProfile:
    """The profiling of one run (rank 0): a StepProfiler over a few steps and an NVMLSampler
    over the whole run, both writing into `out_dir` (the run folder's profile/). Disabled, every
    method does nothing and summary() is empty, so the training loop calls it unconditionally."""

    def __init__(self, out_dir: str | Path, device: torch.device, *, active: int = 3, steps_left: int,
                 first_step: int = 0, enabled: bool = True, nvml_interval_s: float = 0.05):
        self.enabled, self.out_dir = enabled, Path(out_dir)
        if enabled:
            self.steps = StepProfiler(out_dir, device, active=active, steps_left=steps_left, first_step=first_step)
            self.nvml = NVMLSampler(nvml_interval_s)
        self._closed = False

    def start(self) -> None:
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.nvml.start()
        if not self.nvml.available:
            print(self.nvml.reason)
        self.steps.start()

    def step(self) -> None:
        if self.enabled:
            self.steps.step()

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self._closed = True
        info = self.steps.stop()
        self.nvml.stop()
        self.nvml.write(self.out_dir / "nvml.json")
        if info.get("trace"):
            print(f"profile: trace of steps {info['steps'][0]}..{info['steps'][1]} in {info['trace']} "
                  f"(open it in https://ui.perfetto.dev or chrome://tracing); top ops in {info['top_ops']}")
        else:
            print(f"profile: no trace written ({info.get('reason')})")

    def summary(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {"profile": self.steps.info, "nvml": {**self.nvml.summary(), "file": str(self.out_dir / "nvml.json")}}
