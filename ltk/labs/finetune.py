"""Lab `finetune`: full fine-tuning, LoRA and QLoRA from the same base — what does each train,
where does the memory go, how fast is a step, and how well does it learn the task?

    ltk lab run finetune --quick     # pre-trains gpt-debug (2000 steps), then fine-tunes it three ways on a CPU
    ltk lab run finetune             # the same with longer runs (a GPU)

The base is a GPT the `pretrain` recipe trains on the embedded corpus (or, in code, any run
folder or Hugging Face folder: `run(out, quick, base=...)`); the task is the built-in
instruction task (ltk/training/instruct.py), scored by exact match of greedy answers.

Memory is measured by the training loop right after its first optimizer step, when gradients
and Adam's moments both exist, each storage counted once (ltk/models/qlora.py `memory_breakdown`):
frozen base weights (full precision or 4-bit codes + block statistics), trainable weights,
gradients, optimizer states; activations are the peak of the bytes autograd holds for backward
in that step (ltk/training/memory.py). Beside it, the plan of the same run (`ltk plan --method`,
ltk/parallel/plan_finetune.py), Ψ the parameters, Ψ_q those stored in NF4, ψ the trainable ones
(fp32 here), s the trainable tensors:

    weights     full: 4Ψ   lora: 4Ψ + 4ψ   qlora: 4(Ψ − Ψ_q) + NF4 codes and statistics (≈ Ψ_q·4.127/8) + 4ψ
    gradients   4ψ (ψ = Ψ for full)
    optimizer   8ψ + 4s (Adam's two moments, a step counter per tensor)

The same run on several ranks (PARALLEL: (method, strategy, ranks) settings, the same global
batch) goes through `ltk finetune ... --parallel S --nproc N`: per-rank memory beside the plan at
that world size, the step time, and what each step communicates (ddp: an all-reduce of the
adapters' gradients only; zero3 / fsdp2: the frozen base sharded over the ranks — QLoRA's NF4
codes as bytes — and all-gathered unit by unit, the adapters' gradients reduce-scattered).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ltk.labs.registry import Lab
from ltk.labs.report import Report
from ltk.training.instruct_task import KINDS
from ltk.training.progress import progress

METHODS = ("full", "lora", "qlora")
# (method, strategy, ranks) run on several processes beside the single-process rows: the base
# replicated (ddp), or sharded as LoRA's fp32 weights (zero3) and as QLoRA's NF4 bytes (fsdp2)
PARALLEL = (("lora", "ddp", 2), ("lora", "zero3", 2), ("qlora", "fsdp2", 2))


def lab_settings(quick: bool) -> dict:
    if quick:
        # 2000 steps: a base pre-trained 400 steps has no copying heads yet, and LoRA cannot add
        # them (ltk/training/instruct_task.py); this one learns the task under all three methods
        return dict(pretrain_steps=2000, steps=300, batch=16, eval_examples=64, limit=1200, max_len=128)
    return dict(pretrain_steps=4000, steps=1000, batch=32, eval_examples=200, limit=None, max_len=128)


def _pretrain(out: Path, steps: int) -> Path:
    from ltk.training.presets import get_preset
    from ltk.training.trainer import Trainer

    cfg = get_preset("gpt-debug")
    cfg.trainer.max_steps, cfg.trainer.out_dir, cfg.trainer.progress = steps, str(out), False
    cfg.trainer.eval_every = steps
    result = Trainer(cfg).fit()
    return result.checkpoint


def _plan(run_dir: Path, world: int, strategy: str, seq_len: int) -> dict:
    """The plan of the run in `run_dir` (its config.json) at `world` ranks: ltk/parallel/plan_finetune.py
    through memory_report.plan_for_run, as the trainer sets its peaks against it."""
    from ltk.training.config_file import config_from_dict
    from ltk.training.memory_report import plan_for_run

    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()), run_dir / "config.json")
    cfg.parallel.strategy = strategy
    return plan_for_run(cfg, world, "fp32", seq_len)


def predicted(plan: dict) -> dict[str, float]:
    """The plan's bytes by the lab's columns."""
    c = plan["components"]
    return {"weights": c["base_nf4_packed"] + c["base_nf4_stats"] + c["base_full"] + c["trainable"],
            "gradients": c["gradients"], "optimizer": c["optimizer_states"], "activations": plan["activations"]}


def _measured(summary: dict) -> dict[str, float]:
    m = summary["memory"]
    weights = m.get("base_nf4_packed", 0) + m.get("base_nf4_stats", 0) + m.get("base_full", 0) + m.get("trainable", 0)
    return {"weights": weights, "gradients": m["gradients"], "optimizer": m["optimizer_states"],
            "activations": m["activations"]}


def _share(v: float | None) -> str:
    """A kind the evaluation did not score is not measured ("n/m"), not 0%."""
    return "n/m" if v is None else f"{v:.0%}"


def _plot(rows: dict[str, dict], parallel: dict[str, dict]):
    """Stacked bars: one process per method, then one rank of each run on several."""
    import matplotlib.pyplot as plt

    bars = {m: r["measured"] for m, r in rows.items()}
    bars.update({f"{r['method']}\n{r['strategy']} x{r['nproc']}\n(a rank)": r["measured"] for r in parallel.values()})
    fig, ax = plt.subplots(figsize=(6.5 + 0.8 * len(parallel), 4))
    bottom = [0.0] * len(bars)
    for part, color in (("weights", "C0"), ("gradients", "C1"), ("optimizer", "C2"), ("activations", "C3")):
        vals = [m[part] / 2**20 for m in bars.values()]
        ax.bar(list(bars), vals, bottom=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="MiB after the first optimizer step", title="Where the memory goes, by method and engine")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    return fig


def _settings(s: dict, base: str, method: str, out_dir: Path, device: str = "auto"):
    from ltk.training.finetune import FinetuneConfig

    return FinetuneConfig(method=method, base=base, data="builtin", out_dir=str(out_dir), steps=s["steps"],
                          batch_size=s["batch"], eval_every=s["steps"], eval_examples=s["eval_examples"],
                          limit=s["limit"], max_len=s["max_len"], device=device)


# FinetuneConfig fields -> `ltk finetune` flags, for a run on several processes
FLAGS = {"method": "--method", "base": "--base", "data": "--data", "out_dir": "--out", "steps": "--steps",
         "batch_size": "--batch-size", "max_len": "--max-len", "eval_every": "--eval-every",
         "eval_examples": "--eval-examples", "limit": "--limit", "device": "--device"}


def run_parallel(cfg, strategy: str, nproc: int) -> dict:
    """`cfg` (a FinetuneConfig) on `nproc` ranks through `ltk finetune ... --parallel STRATEGY
    --nproc N` (torchrun; gloo on a CPU); returns the run's summary.json."""
    from dataclasses import fields

    from ltk.training.finetune import FinetuneConfig

    default = FinetuneConfig()
    argv = [sys.executable, "-m", "ltk.cli", "finetune", "--parallel", strategy, "--nproc", str(nproc)]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in FLAGS and value is not None:
            argv += [FLAGS[f.name], str(value)]
        elif f.name not in FLAGS and value != getattr(default, f.name):
            raise ValueError(f"run_parallel passes no flag for {f.name}={value!r}: add it to FLAGS")
    out = Path(cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cfg.device == "cpu" else {})}
    proc = subprocess.run(argv, env=env)
    if proc.returncode:
        raise RuntimeError(f"the {cfg.method} run on {nproc} ranks ({strategy}) failed with exit code "
                           f"{proc.returncode}; its output is above, its run folder {out}")
    return json.loads((out / "summary.json").read_text())


STATES = ("weights", "gradients", "optimizer")


def _exact(r: dict) -> bool:
    return all(r["measured"][k] == r["predicted"][k] for k in STATES)


def _plan_text(rows: dict, parallel: dict, s: dict) -> str:
    """What the plan columns and the rows on several ranks say, from the numbers measured."""
    every = [*rows.values(), *parallel.values()]
    exact = sum(_exact(r) for r in every)
    acts = [r["measured"]["activations"] / r["predicted"]["activations"] for r in every]
    text = (f"The plan (`ltk plan --method`, ltk/parallel/plan_finetune.py) gives the weights, gradients and "
            f"optimizer states of {exact} of these {len(every)} runs byte for byte"
            + ("" if exact == len(every) else " (the others differ: see results.json)")
            + f"; its activations are a formula (Korthikanti et al. with LoRA's r-wide intermediates): the peak "
            f"autograd held was {min(acts):.2f}x to {max(acts):.2f}x of it.")
    for r in parallel.values():
        text += "\n\n" + _parallel_text(r, rows, s)
    return text


def _parallel_text(r: dict, rows: dict, s: dict) -> str:
    """One run on several ranks beside the same method on one process."""
    mib, one, sm = 2**20, rows[r["method"]], r["summary"]
    me, me1 = r["measured"], one["measured"]
    sends = ", ".join(f"{op.replace('_', '-')} {b / mib:.2f} MiB" for op, b in r["comm"].items())
    head = f"On {r['nproc']} {r['strategy']} ranks (the same global batch, {r['method']}) each rank holds "
    if r["strategy"] in ("zero3", "fsdp2"):
        share = ", ".join(f"{k} {me[k] / mib:.2f} MiB against {me1[k] / mib:.2f}" for k in STATES)
        head += f"""{share} on one process ({sum(me[k] for k in STATES) / sum(me1[k] for k in STATES):.0%} of
its states: {r['strategy']} shards the frozen base{" (QLoRA's NF4 codes as bytes)" if r['method'] == 'qlora' else ''},
the adapters and their optimizer state over the ranks), and activations for its share of the batch:
{me['activations'] / mib:.2f} MiB against {me1['activations'] / mib:.2f}. A step sends {sends}: the whole
model is all-gathered unit by unit{' (the frozen base as bytes)' if r['strategy'] == 'zero3' else ''}, only
the adapters' gradients are reduced — sharding the base buys memory with bandwidth, where ddp sends
{4 * sm['trainable_params'] / mib:.2f} MiB."""
    else:
        same = all(me[k] == me1[k] for k in STATES)
        psi = 4 * rows["full"]["summary"]["trainable_params"]
        head += f"""{'the same' if same else 'other'} weights, gradients and optimizer bytes as one process
({r['strategy']} replicates them), and activations for its share of the batch:
{me['activations'] / mib:.2f} MiB against {me1['activations'] / mib:.2f}. A step sends {sends} — the
adapters' gradients only; full fine-tuning under ddp would all-reduce {psi / mib:.2f} MiB."""
    moved = round(abs(sm["after"]["exact_match"] - one["summary"]["after"]["exact_match"]) * s["eval_examples"])
    return head + f""" A step took
{sm['step_ms_median']:.0f} ms against {one['summary']['step_ms_median']:.0f} ms on one process (here the ranks
share this machine's cores). Exact match after training: {sm['after']['exact_match']:.1%} against
{one['summary']['after']['exact_match']:.1%} on one process, val loss {sm['after']['val_loss']:.3f} against
{one['summary']['after']['val_loss']:.3f}: the same data and the same global batch, the runs differ only in
the order of floating-point sums, which over {s['steps']} steps and greedy answers moved {moved} of the
{s['eval_examples']} answers scored."""


def _mib(me: dict, pr: dict, part: str) -> str:
    return f"{me[part] / 2**20:.2f} / {pr[part] / 2**20:.2f}"


def run(out: Path, quick: bool, base: str | None = None) -> Path:
    import torch

    from ltk.training.finetune import run_finetune

    s = lab_settings(quick)
    shown = base or f"gpt-debug pre-trained {s['pretrain_steps']} steps on the embedded corpus (this lab's recipe)"
    base = base or str(_pretrain(out / "base", s["pretrain_steps"]))
    rows, parallel = {}, {}
    for method in progress(METHODS, desc="finetune lab", unit="method"):
        summary = run_finetune(_settings(s, base, method, out / method))
        plan = _plan(out / method, 1, "none", s["max_len"])
        rows[method] = {"summary": summary, "measured": _measured(summary), "predicted": predicted(plan)}
    for method, strategy, nproc in PARALLEL:
        device = "auto" if torch.cuda.device_count() >= nproc else "cpu"
        summary = run_parallel(_settings(s, base, method, out / f"{method}-{strategy}{nproc}", device), strategy, nproc)
        plan = _plan(out / f"{method}-{strategy}{nproc}", nproc, strategy, s["max_len"])
        comm = summary.get("timeline", {}).get("per_rank", [{}])[0].get("comm")
        parallel[f"{method}-{strategy}{nproc}"] = {
            "method": method, "strategy": strategy, "nproc": nproc, "summary": summary,
            "measured": _measured(summary), "predicted": predicted(plan), "comm": plan["comm"]["data_parallel"],
            "exposed_comm_ms": None if comm is None else 1e3 * comm}
    table = []
    for method, r in rows.items():
        sm, me, pr = r["summary"], r["measured"], r["predicted"]
        table.append([method, f"{sm['trainable_params']:,} of {sm['params']:,}", _mib(me, pr, "weights"),
                      _mib(me, pr, "gradients"), _mib(me, pr, "optimizer"), _mib(me, pr, "activations"),
                      round(sm["step_ms_median"], 1),
                      f"{sm['before']['exact_match']:.1%} → {sm['after']['exact_match']:.1%}",
                      " / ".join(_share(sm["after"].get("exact_match/" + k)) for k in KINDS),
                      f"{sm['before']['val_loss']:.3f} → {sm['after']['val_loss']:.3f}"])
    rep = Report("Lab: full fine-tuning, LoRA and QLoRA", "From the same base, what does each method train, "
                 "where does the memory go, how fast is a step, and how well does it learn the task?",
                 "ltk lab run finetune" + (" --quick" if quick else ""))
    rep.table(["method", "trainable params", "weights MiB (measured / plan)", "gradients MiB", "optimizer MiB",
               "activations MiB (measured / plan)", "step ms", "exact match before → after",
               "after, by kind (" + " / ".join(KINDS) + ")", "val loss before → after"],
              table, f"Base: {shown}; built-in task; {s['steps']} steps of {s['batch']} examples; fp32 on this device; "
              "plan: `ltk plan --method M --world 1 --strategy none`.")
    rep.plot("memory", _plot(rows, parallel), "memory by component after the first optimizer step: per method on "
             "one process, and per rank of the runs on several")
    if parallel:
        ptable = []
        for r in parallel.values():
            sm, me, pr = r["summary"], r["measured"], r["predicted"]
            ops = ", ".join(f"{op.replace('_', '-')} {b / 2**20:.2f}" for op, b in r["comm"].items())
            ptable.append([r["method"], f"{r['strategy']} x {r['nproc']}", _mib(me, pr, "weights"),
                           _mib(me, pr, "gradients"), _mib(me, pr, "optimizer"), _mib(me, pr, "activations"),
                           ops, round(sm["step_ms_median"], 1),
                           "n/m" if r["exposed_comm_ms"] is None else round(r["exposed_comm_ms"], 1),
                           f"{sm['before']['exact_match']:.1%} → {sm['after']['exact_match']:.1%}",
                           f"{sm['before']['val_loss']:.3f} → {sm['after']['val_loss']:.3f}"])
        rep.table(["method", "engine x ranks", "weights MiB per rank (measured / plan)", "gradients MiB",
                   "optimizer MiB", "activations MiB (measured / plan)", "sent per step MiB (plan)", "step ms",
                   "exposed comm ms", "exact match before → after", "val loss before → after"], ptable,
                  f"The same runs on several processes, the same global batch of {s['batch']} examples split over "
                  "the ranks; memory of rank 0 (ddp replicates it; zero3 and fsdp2 shard it, rank 0 holding the most); "
                  "plan: `ltk plan --method M --world N "
                  "--strategy S`; exposed comm: the step's median time in collectives not hidden behind "
                  "compute (ltk/parallel/timeline.py).")
    full, lora = rows["full"]["summary"], rows["lora"]["summary"]
    rep.text(f"""## What it shows

LoRA trains {lora['trainable_params']:,} parameters instead of {full['trainable_params']:,}
({lora['trainable_params'] / full['trainable_params']:.1%}): its gradients and Adam moments shrink by the
same factor, while the frozen weights stay. QLoRA also stores the adapted layers' weights in 4
bits (NF4 codes + block statistics), so the weights column falls too; on a model this small
the embedding and head, which stay in full precision, are most of what is left. Activations
do not depend on the method — they depend on the batch and the sequence — which is why at
large batch sizes activation checkpointing matters as much as the method. Full fine-tuning
usually learns the task fastest per step; the adapters get most of the way with a fraction
of the trainable state — when the base already has the skill. Copying letters needs
attention heads that copy (induction heads), which form in pre-training: LoRA adapts them
with a low-rank change, but from a base pre-trained for 400 steps, which has none yet, it
learns `last` to 2% where full fine-tuning reaches 100% (ltk/training/instruct_task.py). This
base was pre-trained {s['pretrain_steps']} steps for that reason.

{_plan_text(rows, parallel, s)}""")
    rep.results.update({"settings": s, "base": base, "rows": rows, "parallel": parallel})
    path = rep.write(out)
    print(f"\nreport: {path}")
    return path


LAB = Lab(
    name="finetune",
    question="Full vs LoRA vs QLoRA from the same base: trainable parameters, memory by component, step time, "
             "accuracy?",
    run=run,
    quick_minutes=9.0,
)
