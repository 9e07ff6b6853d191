"""What one Trainer.fit() measures and writes about itself, besides its checkpoints.

In the run folder (rank 0):

    config.json      the run's configuration, written as fit() starts (`announce`)
    metrics.jsonl    one row per logged step (Trainer._log, ltk/training/loggers.py), its
                     throughput from `RunMonitor.row`; loss.png drawn from it on every exit path
                     (`close_logs`, ltk/training/run_plot.py)
    summary.json     the last row, the memory by category and per rank beside the plan, the
                     profile's and timeline's figures, the median step time (`RunMonitor.finish`)
    memory.png       with trainer.memory_trace: every rank's trace beside the plan

Throughput over the window since the last logged row, W tokens in Δt seconds:

    tokens/s = W / Δt,    MFU = tokens/s · flops_per_token / peak FLOP/s

(Chowdhery et al. 2022, PaLM, appendix B: model FLOPs, not hardware FLOPs; flops_per_token from
the family, ltk/models; the device's peak from ltk/training/hardware.py, no MFU where unknown).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ltk.models.qlora import memory_breakdown
from ltk.parallel.comm_meter import CommMeter, comm_summary
from ltk.parallel.timeline import Timeline
from ltk.training.loggers import Loggers
from ltk.training.memory import MemoryProbe
from ltk.training.memory_report import memory_report
from ltk.training.memory_watch import MemoryWatch
from ltk.training.profiling import RunProfile
from ltk.training.progress import progress_enabled
from ltk.training.run_folder import RunFolder
from ltk.training.run_plot import plot_at_end, plot_run

if TYPE_CHECKING:
    from ltk.training.trainer import Trainer


def step_size(tr: Trainer) -> str:
    t = tr.cfg.trainer
    if tr.task is None:
        return f"{tr.tokens_per_step:,} tokens/step"
    return f"{t.batch_size * t.grad_accum} examples/step ({tr.cfg.adapter.method} adapter)"


def announce(tr: Trainer, folder: RunFolder) -> None:
    """Rank 0 as fit() starts: config.json and the run's opening line."""
    if tr.resume is not None or tr.auto:
        folder.trim_metrics(tr.step)  # rows of steps after the checkpoint are trained again
    (tr.run_dir / "config.json").write_text(tr.cfg.to_json())
    print(
        f"{tr.cfg.family} model: {tr.num_params:,} parameters | {step_size(tr)} | "
        f"device {tr.rt.device} ({tr.rt.dtype}) x {tr.rt.world_size} | run folder {tr.run_dir}"
    )


def close_logs(logger: Loggers, run_dir: Path, is_main: bool) -> None:
    """Every exit path: close the sinks, then draw loss.png from the rows logged so far."""
    try:
        logger.close()
    finally:
        if is_main and plot_at_end():
            try:
                plot_run(run_dir)
            except Exception as e:  # noqa: BLE001 - a failed plot must not hide the run's own error
                print(f"warning: could not draw {run_dir / 'loss.png'}: {e}")


def plot_memory(run_dir: Path, per_rank: dict[str, Any]) -> None:
    """memory.png: every rank's trace beside the plan and 16Ψ (ltk/training/memory_plot.py)."""
    from ltk.training.memory_plot import plot_memory as draw

    try:
        draw(run_dir / "memory", run_dir / "memory.png", per_rank)
    except Exception as e:  # noqa: BLE001 - a failed plot must not fail a finished run
        print(f"warning: could not draw {run_dir / 'memory.png'}: {e}")


class RunMonitor:
    """The instruments of one fit(), made in this order; the loop drives them.

        bar        tqdm over the steps: rank 0, trainer.progress, a terminal unless LTK_PROGRESS says
        window     tokens and seconds since the last logged row; every step's wall time
        memory     bytes by category, measured on the first step (ltk/training/memory.py)
        watch      each rank's peak per phase (init, train, eval, save); with memory_trace a
                   timeline (ltk/training/memory_watch.py)
        profile    --profile: torch.profiler over a few steps, NVML over the run (ltk/training/profiling.py)
        timeline   multi-process runs: each step per rank split into compute / exposed comm / idle
                   (ltk/parallel/timeline.py)
        comm       multi-process runs: the payload bytes of each step's collectives, by collective,
                   beside the plan's (ltk/parallel/comm_meter.py)
    """

    def __init__(self, tr: Trainer):
        t, rt = tr.cfg.trainer, tr.rt
        show = t.progress and rt.is_main and progress_enabled()  # a terminal, unless LTK_PROGRESS says
        self.bar = tqdm(total=t.max_steps, initial=tr.step, disable=not show, unit="step")
        self.window_t, self.window_tokens, self.step_times = time.perf_counter(), 0, []
        self.started = time.perf_counter()
        engine = getattr(tr.par, "engine", None)  # ZeRO-3: the rank's shards, not the model's freed views
        detail = (lambda: memory_breakdown(tr.model, tr.optimizer, engine)) if tr.task else None
        self.memory = MemoryProbe(tr.par, rt.device, detail)
        self.watch = MemoryWatch(rt.device, rt.rank, tr.run_dir, trace=t.memory_trace,
                                 interval_s=t.memory_trace_ms / 1e3)
        self.profile = RunProfile(tr.run_dir / "profile", rt.device, active=t.profile_steps, first_step=tr.step,
                                  steps_left=t.max_steps - tr.step, enabled=t.profile and rt.is_main)
        self.timeline = Timeline(rt.device, enabled=rt.world_size > 1 and t.timeline)
        self.comm = CommMeter(enabled=rt.world_size > 1)

    def start(self) -> None:
        self.watch.start()  # the end of "init": data, model and engine are built
        self.profile.start()

    def step_done(self, seconds: float, tokens: int) -> None:
        self.step_times.append(seconds)
        self.window_tokens += tokens
        self.comm.step_done()

    def row(self, tr: Trainer, loss: float, grad_norm: float) -> dict[str, Any]:
        """The logged row of this step, its throughput over the window (module docstring)."""
        if tr.rt.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.window_t
        tok_s = self.window_tokens / max(elapsed, 1e-9)
        row = {"step": tr.step, "loss": loss, "lr": tr.optimizer.param_groups[0]["lr"],
               "grad_norm": grad_norm, "tokens": tr.tokens_seen, "tokens_per_s": tok_s}
        if tr.peak:
            row["mfu"] = tok_s * tr.flops_per_token / tr.peak
        return row

    def logged(self, row: dict[str, Any]) -> None:
        """After a row is logged: the timeline's flush (a collective: every rank logs at the same
        steps), a new window (evaluation and logging not counted in it), the bar's figures."""
        self.timeline.flush()
        self.window_t, self.window_tokens = time.perf_counter(), 0
        shown = ("loss", "val_loss", "tokens_per_s", "mfu")
        self.bar.set_postfix({k: f"{row[k]:.4g}" for k in shown if k in row})

    def close(self) -> None:
        self.watch.stop()
        self.bar.close()
        self.profile.close()

    def finish(self, tr: Trainer, last: dict[str, Any], ckpt: Path | None) -> None:
        """Every rank's memory peaks gathered on rank 0 (a collective), which writes summary.json
        and, with trainer.memory_trace, memory.png."""
        ranks = self.watch.gather(tr.rt.world_size)
        if not (tr.rt.is_main and last):
            return
        per_rank = memory_report(ranks, tr.cfg, tr.rt.world_size, tr.rt.dtype, tr.seq_len, tr.num_params)
        summary = {"step": tr.step, "params": tr.num_params, "checkpoint": str(ckpt), **last,
                   "memory": self.memory.result, "memory_per_rank": per_rank, **self.profile.summary(),
                   **self.timeline.summary(), "seconds": time.perf_counter() - self.started}
        if self.step_times:
            summary["step_ms_median"] = 1e3 * sorted(self.step_times)[len(self.step_times) // 2]
        if self.comm.steps:  # rank 0's collectives per step beside the plan's
            summary["comm_per_step"] = comm_summary(self.comm, tr.cfg, tr.rt.world_size, tr.rt.dtype, tr.seq_len)
        if tr.task is not None:
            summary.update(tr.task.summary(tr.model, tr.before, last, self.memory.result))
        if tr.base_load is not None:  # rank 0's: what set-up held of the frozen base
            summary["base_load"] = tr.base_load
        if tr.init_from is not None:
            summary["init_from"] = str(tr.init_from.path)
        (tr.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if tr.cfg.trainer.memory_trace and plot_at_end():
            plot_memory(tr.run_dir, per_rank)
