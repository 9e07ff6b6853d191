"""parallel-memory: what each rank of a sharded `ltk train` run really holds, phase by phase (init,
train, eval, save), against what `ltk plan` promises for the same flags and against one full copy
of the model states — measured on the real code path, the command a user would type:

    ltk train --preset gpt2-350m --trainer.seq_len 128 --trainer.batch_size 4 --trainer.dtype fp32 \\
        --parallel zero3 --nproc 4 --max-steps 2 --trainer.eval_batches 2 --trainer.memory_trace true ...

two optimizer steps, then an evaluation and a checkpoint save (the run's last step does both).
Each rank's peak per phase comes from its trace (ltk/training/memory_watch.py: on a CPU the
kernel's peak RSS, VmHWM, reset at every phase boundary, so no spike between samples is missed),
taken above the RSS the process had before it prepared data and built the model (the
interpreter and the torch libraries, several hundred MB that no plan counts).

Goals (issue 14), at every rank and every phase:
  plan       peak above baseline <= 1.25 x the plan's per-rank total (ltk/parallel/plan.py:
             sharded model states + activations + fp32 logits)
  full copy  peak above baseline < 16Ψ bytes, one full copy of weights, gradients and Adam's
             moments: a sharded run that holds that much anywhere (building the model, gathering
             it to evaluate or to save) does not scale to models that need sharding.
A phase the run never reached (killed for memory, failed) fails both goals.

A watchdog kills the whole process tree when the machine's available memory falls below
--min-free-gb (four 350M ranks on a 23 GB machine can exhaust it): the traces, flushed once a
second, still give every rank's figures up to then, and the result says where it stopped.

    ltk bench parallel-memory --save-results ltk/bench/results     # + .json and .png beside the .md
    ltk bench parallel-memory --quick                              # gpt-debug on 2 ranks, < 1 min

The allocator. On a CPU, RSS counts what glibc's malloc holds, not only live tensors. glibc serves
a request above its mmap threshold with its own mapping, returned to the kernel on free, and one
below it from an arena, whose freed pages it keeps; the threshold is dynamic, rising to the size
of the largest mapping freed so far (up to 32 MB). An engine that allocates and frees many tensors
of a few MB each (FSDP2: a block's parameters and gradients, one tensor per parameter, every
step) soon has its arenas hold the freed ones, and the RSS peak grows with them: gpt2-350m x 4 under
fsdp2 peaked at 1.45x the plan with glibc's default, at 1.00x with a fixed threshold. So the
benchmark fixes it (--malloc-mmap-threshold, bytes, passed as MALLOC_MMAP_THRESHOLD_ to every rank;
default 128 KiB, glibc's own starting value) and measures what the tensors hold, as
torch.cuda.max_memory_allocated does on a GPU; 0 leaves glibc's default and measures its cache too.

--quick checks the path, not the goals: a model of 1M parameters is outweighed by what any
process's allocator, thread pools and autograd hold (about 100 MB), so its ratios are large.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ltk.bench.harness import Row

GIB = 2**30
PHASES = ("init", "train", "eval", "save")
PLAN_TOLERANCE = 1.25


class MemoryRows(list):
    """The rows, plus what write_result puts beside them: the verdict sections of the .md, and
    the full result as .json and the plot as .png next to it (`write_beside`)."""

    def __init__(self, rows: list[Row], result: dict[str, Any], drawn: Path | None):
        super().__init__(rows)
        self.result, self.drawn = result, drawn
        self.sections = {"Verdict": verdict_markdown(result), "Train command": f"```\n{result['command']}\n```"}

    def write_beside(self, stem: Path) -> list[Path]:
        json_path = stem.with_suffix(".json")
        json_path.write_text(json.dumps(self.result, indent=1))
        if self.drawn is None:
            return [json_path]
        return [json_path, Path(shutil.copyfile(self.drawn, stem.with_suffix(".png")))]


def train_args(preset: str, world: int, strategy: str, seq_len: int, batch_size: int, dtype: str, steps: int,
               eval_batches: int, out: str, device: str, interval_ms: float, overrides: list[str] = ()) -> list[str]:
    """The `ltk train` arguments: the run's own flags, then what the measurement needs."""
    run = ["--preset", preset, *overrides, "--trainer.seq_len", str(seq_len), "--trainer.batch_size", str(batch_size),
           "--trainer.dtype", dtype]
    if world > 1:
        run += ["--parallel", strategy, "--nproc", str(world)]
    return run + ["--max-steps", str(steps), "--trainer.eval_every", "0", "--trainer.eval_batches", str(eval_batches),
                  "--trainer.ckpt_every", "0", "--trainer.keep_last", "1", "--trainer.log_every", "1",
                  "--trainer.memory_trace", "true", "--trainer.memory_trace_ms", str(interval_ms),
                  "--trainer.progress", "false", "--device", device, "--out", out, "--overwrite"]


# -- the process tree ---------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """pid, then all its descendants, read from /proc (torchrun runs in a session of its own: a
    process group would miss it)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _kill_tree(pid: int) -> None:
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_watched(cmd: list[str], env: dict[str, str], min_free: float, timeout_s: float) -> dict[str, Any]:
    """Run `cmd`, its output to our stderr (stdout keeps the rows); every 0.25 s note the
    machine's available memory and the RSS of the whole tree, and kill the tree when the
    available memory falls below `min_free` bytes or `timeout_s` passes."""
    from ltk.models.sizing import available_bytes

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
    low, tree_peak, aborted = available_bytes("cpu"), 0, None
    while proc.poll() is None:
        free = available_bytes("cpu")
        low = min(low, free)
        tree_peak = max(tree_peak, sum(_rss(p) for p in process_tree(proc.pid)))
        if free < min_free:
            aborted = (f"killed: the machine's available memory fell to {free / GIB:.2f} GiB "
                       f"(--min-free-gb {min_free / GIB:g})")
        elif time.monotonic() - t0 > timeout_s:
            aborted = f"killed: still running after --timeout-s {timeout_s:g}"
        if aborted:
            _kill_tree(proc.pid)
            break
        time.sleep(0.25)
    return {"returncode": proc.wait(), "aborted": aborted, "wall_s": time.monotonic() - t0,
            "min_available_bytes": low, "peak_tree_rss_bytes": tree_peak}


# -- reading the run back ---------------------------------------------------------------------------
def run_config(preset: str, overrides: list[str], out: Path):
    """The run's config: the preset with the command's overrides; the vocabulary as the run
    resolved it (config.json, written when training starts), else the tokenizer's size."""
    from ltk.training.config import apply_overrides
    from ltk.training.presets import get_preset

    cfg = get_preset(preset)
    apply_overrides(cfg, overrides)
    written = out / "config.json"
    if written.exists():
        cfg.model.vocab_size = json.loads(written.read_text())["model"]["vocab_size"]
    elif getattr(cfg.model, "vocab_size", 1) == 0:
        cfg.model.vocab_size = cfg.data.vocab_size
    return cfg


def rank_results(trace_dir: Path, cuda: bool) -> list[dict[str, Any]]:
    """Each rank's figures from its trace, as MemoryWatch.result gives them; a phase the trace
    ends inside (a killed run) is its largest sample, and the rank says it is incomplete."""
    from ltk.training.memory_plot import read_traces
    from ltk.training.memory_watch import trace_peaks

    out = []
    for rank, tr in read_traces(trace_dir).items():
        base = tr["baseline"][1] if tr["baseline"] and not cuda else 0
        peaks = trace_peaks(tr)
        last_end = tr["ends"][-1][0] if tr["ends"] else -1.0
        complete = not any(t > last_end for t, _, _ in tr["samples"])
        peak = max(peaks.values(), default=base)
        out.append({"rank": rank, "measure": "cuda_allocated" if cuda else "rss", "baseline": base, "peak": peak,
                    "peak_above_baseline": peak - base, "phases": peaks, "complete": complete})
    return out


def judge(ranks: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """Both goals over every rank and phase (after memory_report.compare): pass or fail, the
    worst ratio and where, and the phases a rank never reached."""
    missing = {r["rank"]: [p for p in PHASES if p not in r["phases"]] for r in ranks}
    missing.update({r: list(PHASES) for r in range(world) if r not in missing})
    missing = {r: m for r, m in sorted(missing.items()) if m}
    out = {}
    for goal, key, limit, strict in (("plan", "vs_plan", PLAN_TOLERANCE, False),
                                     ("full_copy", "vs_full_copy", 1.0, True)):
        cells = [(ph[key], r["rank"], name) for r in ranks for name, ph in r["phases"].items() if ph[key] is not None]
        if not cells:
            out[goal] = {"pass": False, "limit": limit, "worst": None, "why": "nothing measured"}
            continue
        ratio, rank, phase = max(cells)
        ok = (ratio < limit if strict else ratio <= limit) and not missing
        by_phase = {p: max((c[0] for c in cells if c[2] == p), default=None) for p in PHASES}
        out[goal] = {"pass": ok, "limit": limit, "worst": {"ratio": ratio, "rank": rank, "phase": phase},
                     "worst_by_phase": by_phase}
    out["phases_not_reached"] = missing
    return out


def verdict_markdown(result: dict[str, Any]) -> str:
    """The verdict table of the .md: per phase, the largest rank's peak and both ratios."""
    g, plan_total, full = result["goals"], result["plan"]["total"], result["full_copy"]
    lines = [f"Plan per rank {plan_total / GIB:.3f} GiB ({result['plan']['strategy']}, {result['world']} ranks); "
             f"one full copy of the model states 16Ψ = {full / GIB:.3f} GiB (Ψ = {result['params']:,}).", "",
             "| phase | largest peak above baseline GiB | x plan (goal <= 1.25) | x 16Ψ (goal < 1) |",
             "|---|---|---|---|"]
    for p in PHASES:
        above = [r["phases"][p]["above_baseline"] for r in result["ranks"] if p in r["phases"]]
        if not above:
            lines.append(f"| {p} | not reached | FAIL | FAIL |")
            continue
        a = max(above)
        lines.append(f"| {p} | {a / GIB:.3f} | {a / plan_total:.2f} {'ok' if a <= 1.25 * plan_total else 'FAIL'} | "
                     f"{a / full:.2f} {'ok' if a < full else 'FAIL'} |")
    lines += ["", f"- within 1.25x the plan: **{'PASS' if g['plan']['pass'] else 'FAIL'}**",
              f"- below one full copy (16Ψ) at every moment: **{'PASS' if g['full_copy']['pass'] else 'FAIL'}**"]
    if g["phases_not_reached"]:
        lines.append(f"- phases not reached: {g['phases_not_reached']}")
    run = result["run"]
    lines.append(f"- run: exit code {run['returncode']}, {run['wall_s']:.0f} s"
                 + (f", {run['aborted']}" if run["aborted"] else "")
                 + f"; all ranks together peaked at {run['peak_tree_rss_bytes'] / GIB:.2f} GiB RSS, the machine's "
                 f"available memory fell to {run['min_available_bytes'] / GIB:.2f} GiB")
    return "\n".join(lines)


def plot(result: dict[str, Any], trace_dir: Path, path: Path) -> Path:
    from ltk.training.memory_plot import plot_memory

    g = result["goals"]
    title = (f"{result['preset']}, {result['strategy']} x {result['world']} ranks, T={result['seq_len']} "
             f"B={result['batch_size']} {result['dtype']}: plan {'PASS' if g['plan']['pass'] else 'FAIL'}, "
             f"below 16Ψ {'PASS' if g['full_copy']['pass'] else 'FAIL'}")
    return plot_memory(trace_dir, path, result, title=title)


def run(preset: str | None = None, world: int | None = None, strategy: str = "zero3", seq_len: int | None = None,
        batch_size: int = 4, dtype: str = "fp32", steps: int = 2, eval_batches: int | None = None,
        out: str = "runs/bench-parallel-memory", device: str = "cpu", quick: bool = False,
        min_free_gb: float = 1.0, timeout_s: float = 3600.0, interval_ms: float = 25.0,
        overrides: str | None = None, malloc_mmap_threshold: int = 131072) -> MemoryRows:
    """Run the training command, read every rank's trace, judge the goals; one Row per (rank,
    phase) with the peak above baseline in peak_mem_mb, the ratios in `extra`. `overrides`:
    more `--section.field value` pairs for the run (and its plan), e.g. another data source."""
    from ltk.models import get_family
    from ltk.training.memory_report import FULL_STATE_BYTES_PER_PARAM, compare, plan_for_run

    preset = preset or ("gpt-debug" if quick else "gpt2-350m")
    world = world or (2 if quick else 4)
    seq_len = seq_len or (64 if quick else 128)
    eval_batches = eval_batches or (1 if quick else 2)
    out_dir = Path(out)
    extra = shlex.split(overrides or "")
    args = train_args(preset, world, strategy, seq_len, batch_size, dtype, steps, eval_batches, str(out_dir), device,
                      interval_ms, extra)
    env = dict(os.environ, LTK_PROGRESS="0")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo ranks on the CPU even where a GPU is present
        if malloc_mmap_threshold > 0:  # RSS as live tensors, not glibc's arenas (module docstring)
            env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    watched = run_watched([sys.executable, "-m", "ltk.cli", "train", *args], env, min_free_gb * GIB, timeout_s)
    malloc = f"MALLOC_MMAP_THRESHOLD_={env['MALLOC_MMAP_THRESHOLD_']} " if "MALLOC_MMAP_THRESHOLD_" in env else ""

    same = [*extra, "--trainer.seq_len", str(seq_len), "--trainer.batch_size", str(batch_size),
            "--trainer.dtype", dtype, *(["--parallel.strategy", strategy] if world > 1 else [])]
    cfg = run_config(preset, same, out_dir)
    p = plan_for_run(cfg, world, dtype, seq_len)
    params = get_family(cfg.family).num_params(cfg.model)
    full = FULL_STATE_BYTES_PER_PARAM * params
    ranks = [compare(r, p["total"], full) for r in rank_results(out_dir / "memory", device.startswith("cuda"))]
    result = {"preset": preset, "world": world, "strategy": strategy if world > 1 else "none", "seq_len": seq_len,
              "batch_size": batch_size, "dtype": dtype, "steps": steps, "eval_batches": eval_batches, "device": device,
              "params": params, "command": malloc + "ltk train " + shlex.join(args),
              "measure": "peak RSS (VmHWM, reset at each phase boundary) above the RSS before data and model, "
                         + (f"MALLOC_MMAP_THRESHOLD_={malloc_mmap_threshold}" if malloc_mmap_threshold > 0
                            else "glibc's default allocator")
                         if device == "cpu" else "torch.cuda.max_memory_allocated",
              "plan": {k: p[k] for k in ("strategy", "zero_stage", "dtype", "params", "grads", "optimizer",
                                         "activations", "total")},
              "full_copy": full, "run": watched, "ranks": ranks}
    result["goals"] = judge(ranks, world)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "parallel-memory.json").write_text(json.dumps(result, indent=1))
    drawn = plot(result, out_dir / "memory", out_dir / "parallel-memory.png") if ranks else None
    g = result["goals"]
    print(f"parallel-memory: within 1.25x plan {'PASS' if g['plan']['pass'] else 'FAIL'}, below 16Ψ "
          f"{'PASS' if g['full_copy']['pass'] else 'FAIL'}; wrote {out_dir / 'parallel-memory.json'}",
          file=sys.stderr)
    shape = f"{preset} ({params / 1e6:.1f}M),{strategy if world > 1 else 'none'}x{world},T={seq_len},B={batch_size}"
    rows = [Row.stamped(device, op="parallel-memory", shape=shape, dtype=dtype, mode=name, provider=f"rank{r['rank']}",
                        median_ms=0.0, p20_ms=0.0, p80_ms=0.0, runs=0, peak_mem_mb=ph["above_baseline"] / 2**20,
                        extra=json.dumps({"peak": ph["peak"], "baseline": r["baseline"], "vs_plan": ph["vs_plan"],
                                          "vs_full_copy": ph["vs_full_copy"]}))
            for r in ranks for name, ph in r["phases"].items()]
    return MemoryRows(rows, result, drawn)
