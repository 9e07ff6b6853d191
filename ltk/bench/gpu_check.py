"""The GPU check: one command that, on a CUDA machine, (1) runs every Triton kernel compiled
for real against its float64 reference in fp16 and bf16 — outputs and every gradient —
(2) times the kernel benchmarks against PyTorch, torch.compile, flash-attn, Liger and
bitsandbytes where installed, (3) trains GPT-2 124M for a few dozen steps (bf16 autocast) as
our GPT eager, our GPT torch.compile'd and transformers' GPT-2, reporting tokens/s and MFU for
each, (4) times each autotune candidate of our kernels beside the static ceiling of the
kernel-static report (ltk/bench/candidate_timing.py), and (5) with two GPUs or more, runs the
scaling lab (ltk/labs/scaling.py) and shows its first table; then prints one table and writes
one markdown report with the device, driver, versions and commit, each part's wall seconds
against the 8-minute budget (## Time), and every part or provider that did not run with its reason (## Skipped).

    python -m ltk.bench.gpu_check                       # everything, about 5-8 minutes on an H100/H200
    python -m ltk.bench.gpu_check --only correctness    # the numerics alone, about a minute
    python -m ltk.bench.gpu_check --only train-step     # the GPT-2 124M step alone, about 2-3 minutes
    python -m ltk.bench.gpu_check --only candidates     # every autotune candidate timed, beside its ceiling
    python -m ltk.bench.gpu_check --only engines        # 2+ GPUs: our parallel engines vs production ones
    python -m ltk.bench.gpu_check --out ltk/bench/results   # where the report goes

The CPU test suite checks the kernels through Triton's interpreter, which cannot check
bf16 (its bf16 arithmetic is wrong) nor anything about compiled code (register pressure,
masking of partial tiles on real hardware, races between programs). This script is where
those are checked. Pass rule (as in the tests, FlashAttention's rule): the kernel's error
against float64 is at most 4x the error PyTorch's own op makes in the same precision, plus
a small floor. Nothing is skipped silently: every skipped provider or check is listed.

Time: each part has an estimate (PlanEntry.budget_s, CORRECTNESS_BUDGET_S) whose sum stays
under BUDGET_S = 480 s; the report puts the measured seconds beside them. The scaling lab
(several GPUs only) and the candidate timing (a compile per candidate) are outside that budget.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from ltk.bench.gpu_correctness import (  # noqa: F401
    FLOOR,
    Check,
    _compare,
    correctness_checks,
    glu_case,
    lora_case,
    nf4_case,
    rope_case,
)

BUDGET_S = 480.0  # the whole check on one GPU: at most 8 minutes
TRAIN_STEP_PROVIDERS = "ours,ours-compile,transformers"  # eager, torch.compile'd, the baseline


@dataclass(frozen=True)
class PlanEntry:
    """One timed part of the benchmark sweep."""

    label: str  # the part's name in the report's Time table
    bench: str  # the benchmark's name in bench.BENCHMARKS
    kwargs: dict
    budget_s: float  # estimated wall seconds on an H100/H200, compiles and autotuning included


def benchmark_plan(quick: bool) -> list[PlanEntry]:
    """The benchmark sweep, sized to fit BUDGET_S with the correctness checks
    (CORRECTNESS_BUDGET_S) on one GPU. torch.compile recompiles for every shape, so attention's
    compiled provider is timed at one length only. The train step is GPT-2 124M (B=16, T=1024,
    bf16 autocast): ours eager, ours torch.compile'd, transformers; three untimed warm-up
    steps cover the compile (about a minute of it), then `min_time` seconds per provider over
    two alternating rounds, a few dozen steps each at tens of ms per step."""
    seqs = "1k,4k" if quick else "1k,4k,16k"
    fast = "ours,torch,sdpa,flash-attn"
    return [
        PlanEntry("attention causal", "attention",
                  dict(seq_lens=seqs, causal=True, modes="fwd,fwd+bwd", providers=fast, min_time=0.3),
                  25 if quick else 45),
        PlanEntry("attention torch.compile", "attention",
                  dict(seq_lens="4k", causal=True, modes="fwd,fwd+bwd", providers="torch.compile", min_time=0.3), 40),
        PlanEntry("attention non-causal", "attention",
                  dict(seq_lens="4k", causal=False, modes="fwd,fwd+bwd", providers=fast, min_time=0.3), 15),
        *[PlanEntry(op, op, dict(modes="fwd,bwd", providers="ours,torch,unfused,liger", min_time=0.3), 25)
          for op in ("layernorm", "rmsnorm")],
        PlanEntry("swiglu", "swiglu", dict(modes="fwd,bwd", providers="ours,ours-saved,torch,liger", min_time=0.2), 15),
        PlanEntry("rope", "rope", dict(modes="fwd,bwd", providers="ours,ours-inplace,torch,liger", min_time=0.2), 15),
        PlanEntry("cross-entropy", "cross-entropy",
                  dict(vocab_sizes="128256", tokens="8192", hidden=2048, providers="fused,torch,liger",
                       min_time=0.2), 20),
        PlanEntry("nf4", "nf4", dict(shapes="4096x4096x4096,4096x11008x4096",
                                     providers="ours,ours-reference,bitsandbytes,dense", min_time=0.2), 25),
        PlanEntry("lora", "lora", dict(providers="ours,ours-reference,peft", min_time=0.2), 15),
        PlanEntry("train-step llama (transformers)", "train-step",
                  dict(model="llama", vocab_size=128256, batch_size=4, min_time=1.0, rounds=2,
                       providers="transformers,transformers+ours,transformers+liger"), 25),
        PlanEntry("train-step", "train-step",
                  dict(preset="gpt2-124m", batch_size=16, providers=TRAIN_STEP_PROVIDERS,
                       min_time=1.0 if quick else 2.0, rounds=2), 150),
    ]


CORRECTNESS_BUDGET_S = 60.0
# The candidate timing compiles every candidate (about 25, seconds each) and times each for
# ~0.1 s: a few minutes, outside the 8-minute budget like the scaling lab (`--only candidates`).


def candidate_part(device: torch.device) -> tuple[list[str], list[str]]:
    """(the measured-beside-static table's lines, skipped); a failure of the whole part is a skip."""
    try:
        from ltk.bench.candidate_timing import time_candidates

        return time_candidates(device)
    except Exception as e:
        traceback.print_exc()
        return [], [f"candidate timing: failed: {type(e).__name__}: {e}"[:300]]


def benchmarks(device: torch.device, quick: bool, times: dict[str, float] | None = None,
               only: str | None = None) -> tuple[list, list[str]]:
    """Run the plan (or only its `only` benchmark); returns (rows, skipped) and puts each
    part's wall seconds into `times`. A part that raises is listed as skipped with the error.
    Each benchmark's `run` is called directly, not through `run_benchmark`: the plan passes
    options the command line does not list (train-step's providers); a wrong name still
    raises TypeError from the function's own signature."""
    from ltk.bench import get_benchmark

    times = {} if times is None else times
    rows, skipped = [], []
    for entry in benchmark_plan(quick):
        if only is not None and entry.bench != only:
            continue
        t0 = time.perf_counter()
        try:
            result = get_benchmark(entry.bench).run(device=str(device), **entry.kwargs)
            rows += list(result)
            skipped += [f"{entry.label}: {s.provider}"
                        + ("" if s.point in ("", "*") else f" at {s.point}") + f": {s.reason}"
                        for s in getattr(result, "skipped", [])]
            if entry.bench == "train-step":
                skipped += mfu_missing(list(result))
        except Exception as e:
            skipped.append(f"{entry.label} {entry.kwargs}: {type(e).__name__}: {e}"[:300])
            traceback.print_exc()
        times[entry.label] = time.perf_counter() - t0
        print(f"[gpu_check] {entry.label} done in {times[entry.label]:.0f} s "
              f"(estimate {entry.budget_s:.0f} s)", flush=True)
    return rows, skipped


def mfu_missing(rows: list) -> list[str]:
    """A skip line for each train-step row without an MFU (no datasheet peak for the device,
    or a precision without one), so a missing number is never silent."""
    return [f"train-step MFU of {r.provider}: no datasheet {r.dtype} peak for {r.device} in ltk/bench/peaks.py"
            for r in rows if r.pct_of_peak is None]


def scaling_part(out_dir: Path, quick: bool) -> tuple[dict | None, list[str]]:
    """With two GPUs or more, run the scaling lab (`labs.scaling.run(out_dir, quick)`, which
    returns its report's path) and keep the path and the report's first table; returns
    (result or None, skipped). One GPU, a missing lab, or a failure is a skip with its reason.
    main() passes quick=False: the lab's full preset is the one that runs on the GPUs."""
    n = torch.cuda.device_count()
    if n < 2:
        return None, [f"scaling lab: needs at least 2 GPUs, found {n}"]
    try:
        from ltk.labs import scaling
    except ImportError as e:
        return None, [f"scaling lab: ltk.labs.scaling could not be imported: {type(e).__name__}: {e}"[:300]]
    gc.collect()
    torch.cuda.empty_cache()  # hand this process's cached blocks back before the lab's ranks start
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = Path(scaling.run(out_dir, quick))
        table = first_table(path.read_text())
    except Exception as e:
        traceback.print_exc()
        return None, [f"scaling lab: failed: {type(e).__name__}: {e}"[:300]]
    result = {"report": str(path), "table": table, "gpus": n, "quick": quick}
    return result, ([] if table else [f"scaling lab: its report {path} has no table to show"])


def engines_part(world: int) -> tuple[str | None, list[str]]:
    """With two GPUs or more: `ltk bench parallel-engines --device cuda` over min(GPUs, 4) ranks —
    each of our engines beside the production one, on NCCL; returns (its table, skipped)."""
    n = torch.cuda.device_count()
    if n < 2:
        return None, [f"parallel engines: need at least 2 GPUs, found {n}"]
    try:
        from ltk.bench.parallel_engines import run

        rows = run(world=min(world, n), device="cuda", n_layer=12, n_embd=768, seq=1024, batch=8)
    except Exception as e:
        traceback.print_exc()
        return None, [f"parallel engines: failed: {type(e).__name__}: {e}"[:300]]
    return "\n\n".join(rows.sections.values()), []


def first_table(markdown: str) -> str:
    """The first Markdown table (header, separator, rows) of a text; "" when there is none."""
    lines, table = markdown.splitlines(), []
    for line in lines:
        if line.lstrip().startswith("|"):
            table.append(line.strip())
        elif table:
            break
    return "\n".join(table) if len(table) >= 2 else ""


def machine(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = "unknown"
    for pkg in ("flash_attn", "liger_kernel", "transformers"):
        try:
            mod = __import__(pkg)
            info[pkg] = getattr(mod, "__version__", "installed")
        except ImportError:
            info[pkg] = "not installed"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return info


def train_step_table(rows: list) -> list[str]:
    """The train step's lines: tokens/s and MFU per provider, with the warm-up (compile) time."""
    lines = ["| provider | tokens/s | MFU (% of peak) | TFLOP/s | median ms [p20, p80] | steps timed | "
             "warm-up s (steps) | first-step loss | speedup vs transformers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = json.loads(r.extra) if r.extra else {}
        name = r.provider + (f" ({extra['compile_backend']})" if extra.get("compile_backend") else "")
        warm = (f"{extra['warmup_s']:.1f} ({extra.get('warmup_steps', '?')})"
                if extra.get("warmup_s") is not None else "")
        mfu = "—" if r.pct_of_peak is None else f"{r.pct_of_peak:.1f}"
        loss = "" if extra.get("first_step_loss") is None else f"{extra['first_step_loss']:.4f}"
        lines.append(f"| {name} | {r.throughput:,.0f} | {mfu} | {r.tflops or 0:.3g} | "
                     f"{r.median_ms:.1f} [{r.p20_ms:.1f}, {r.p80_ms:.1f}] | {r.runs} | {warm} | {loss} | "
                     f"{'' if r.speedup is None else f'{r.speedup:.2f}'} |")
    if rows:
        extra = json.loads(rows[0].extra) if rows[0].extra else {}
        lines += ["", f"Shape {rows[0].shape}, {extra.get('precision', rows[0].dtype)}; "
                  "the same weights, batches and AdamW for every provider; warm-up steps (the compile) untimed."]
    return lines


def time_table(times: dict[str, float], budgets: dict[str, float | None], total_s: float | None) -> list[str]:
    """Each part's wall seconds beside its estimate, and the total against BUDGET_S. Parts
    with no estimate (the scaling lab, which needs several GPUs) are outside the budget."""
    lines = ["| part | seconds | estimate (s) |", "|---|---|---|"]
    for part, sec in times.items():
        est = budgets.get(part)
        lines.append(f"| {part} | {sec:.0f} | {'outside the one-GPU budget' if est is None else f'{est:.0f}'} |")
    in_budget = sum(sec for part, sec in times.items() if budgets.get(part) is not None)
    total = total_s if total_s is not None else sum(times.values())
    estimate = sum(budgets[part] for part in times if budgets.get(part) is not None)
    lines.append(f"| **total** | **{total:.0f}** | {estimate:.0f} |")
    verdict = "within" if in_budget <= BUDGET_S else f"OVER by {in_budget - BUDGET_S:.0f} s"
    lines += ["", f"One-GPU parts: {in_budget:.0f} s of the {BUDGET_S:.0f} s (8-minute) budget: {verdict}. "
              "The total also counts set-up and the report."]
    return lines


def report(info: dict, checks: list[Check], rows: list, skipped: list[str], *,
           times: dict[str, float] | None = None, budgets: dict[str, float | None] | None = None,
           total_s: float | None = None, scaling: dict | None = None, candidates: list[str] | None = None) -> str:
    from ltk.bench.harness import rows_to_markdown

    lines = [f"# GPU check on {info['device']} ({info['date'][:10]})", "",
             "Command: `python -m ltk.bench.gpu_check`", "", "## Machine", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    if checks:  # none when the correctness part did not run (listed under Skipped)
        n_pass = sum(c.passed for c in checks)
        lines += ["", f"## Kernels compiled for real vs float64 reference: {n_pass}/{len(checks)} pass", "",
                  "Error = max|ours − ref| / max|ref| per output and gradient (worst shown); "
                  "pass when ≤ 4 × PyTorch's own error in the same dtype + floor.", "",
                  "| kernel | case | dtype | worst error (ours) | PyTorch's error there | result |",
                  "|---|---|---|---|---|---|"]
    for c in checks:
        if c.errors:
            worst = max(c.errors, key=lambda k: c.errors[k] / (4 * c.torch_errors[k] + FLOOR[c.dtype]))
            lines.append(f"| {c.kernel} | {c.case} | {c.dtype} | {worst}: {c.errors[worst]:.2e} | "
                         f"{c.torch_errors[worst]:.2e} | {'PASS' if c.passed else 'FAIL'} |")
        else:
            lines.append(f"| {c.kernel} | {c.case} | {c.dtype} | — | — | ERROR {c.note} |")
    step_rows = [r for r in rows if r.op == "train-step"]
    other = [r for r in rows if r.op != "train-step"]
    if step_rows:
        lines += ["", "## Train step: ours eager, ours torch.compile'd, transformers", ""] + train_step_table(step_rows)
    if other:
        lines += ["", "## Benchmarks", "", rows_to_markdown(other)]
    if candidates:
        lines += ["", "## Autotune candidates: measured beside the static ceiling (bf16)", "",
                  "ceiling, regs, spills: the newest kernel-static report (sm_90a); the backward kernels are "
                  "timed as the whole backward pass with the candidate pinned.", ""] + candidates
    if scaling:
        lines += ["", f"## Scaling lab ({scaling['gpus']} GPUs{', quick preset' if scaling.get('quick') else ''})", "",
                  f"Report: `{scaling['report']}`", ""] + ([scaling["table"]] if scaling.get("table") else [])
    if times:
        lines += ["", "## Time", ""] + time_table(times, budgets or {}, total_s)
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in skipped] or ["- nothing"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltk.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["correctness", "benchmarks", "train-step", "candidates", "scaling", "engines"],
                   help="run one part only (benchmarks = the kernel benchmarks and the train step)")
    p.add_argument("--quick", action="store_true", help="a shorter benchmark sweep")
    p.add_argument("--out", default="ltk/bench/results", help="folder for the markdown report and CSV")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ltk.bench.gpu_check needs a CUDA device: none is visible here, so nothing was checked.\n"
              "The CPU test suite (python -m pytest) checks the kernels through Triton's interpreter.")
        return 2
    start = time.perf_counter()
    device = torch.device("cuda")
    info = machine(device)
    print(json.dumps(info, indent=1), flush=True)
    times: dict[str, float] = {}
    budgets: dict[str, float | None] = {"correctness": CORRECTNESS_BUDGET_S}
    budgets.update({e.label: e.budget_s for e in benchmark_plan(args.quick)})
    budgets["candidate timing"] = None
    budgets["scaling lab"] = None
    skipped: list[str] = []

    def not_run(part: str) -> None:
        skipped.append(f"{part}: not run (--only {args.only})")

    checks: list[Check] = []
    if args.only in (None, "correctness"):
        t0 = time.perf_counter()
        checks = correctness_checks(device)
        times["correctness"] = time.perf_counter() - t0
        print(f"[gpu_check] correctness: {sum(c.passed for c in checks)}/{len(checks)} pass "
              f"in {times['correctness']:.0f} s", flush=True)
    else:
        not_run("correctness")
    rows: list = []
    if args.only in (None, "benchmarks", "train-step"):
        only = "train-step" if args.only == "train-step" else None
        rows, skipped_bench = benchmarks(device, args.quick, times, only=only)
        skipped += skipped_bench
        if args.only == "train-step":
            not_run("kernel benchmarks")
    else:
        not_run("benchmarks and train step")
    candidate_lines: list[str] = []
    if args.only in (None, "candidates"):
        t0 = time.perf_counter()
        candidate_lines, skipped_candidates = candidate_part(device)
        skipped += skipped_candidates
        times["candidate timing"] = time.perf_counter() - t0
    else:
        not_run("candidate timing")
    scaling = None
    if args.only in (None, "scaling"):
        t0 = time.perf_counter()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        # the lab's full preset is its GPU one (its quick preset runs CPU processes), so never quick here
        scaling, skipped_scaling = scaling_part(Path("runs") / "scaling" / stamp, quick=False)
        skipped += skipped_scaling
        if info["gpus"] >= 2:  # it ran (or failed trying): its seconds count
            times["scaling lab"] = time.perf_counter() - t0
    else:
        not_run("scaling lab")
    engines = None
    if args.only in (None, "engines"):
        t0 = time.perf_counter()
        engines, skipped_engines = engines_part(4)
        skipped += skipped_engines
        if info["gpus"] >= 2:
            times["parallel engines"] = time.perf_counter() - t0
    else:
        not_run("parallel engines")
    budgets["parallel engines"] = None
    text = report(info, checks, rows, skipped, times=times, budgets=budgets,
                  total_s=time.perf_counter() - start, scaling=scaling, candidates=candidate_lines)
    if engines:
        text += "\n\n## Our engines vs production ones (GPUs)\n\n" + engines + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in info["device"].lower()).strip("-")
    path = out / f"gpu-check_{slug}_{info['date'][:10]}.md"
    path.write_text(text)
    if rows:
        from ltk.bench.harness import write_csv

        write_csv(rows, out / f"gpu-check_{slug}_{info['date'][:10]}.csv")
    print(f"wrote {path}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
