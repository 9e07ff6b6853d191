"""Measured memory beside the plan: what a run's summary.json says under "memory_per_rank", and
what `ltk bench parallel-memory` judges.

Two yardsticks, per rank:

    plan       ltk/parallel/plan.py's per-rank total for the run's own flags (model states by
               ZeRO stage, Rajbhandari et al. 2020 §3.1, + activations, Korthikanti et al. 2022
               §4.1): what `ltk plan` promises a rank holds
    full copy  one full copy of the model states, 16Ψ bytes for Ψ parameters trained with Adam
               (fp32: 4 weights + 4 gradients + 8 moments; mixed precision: 2 + 2 + 12): what
               sharding exists to avoid on any rank, at any moment

Both are set against the peak *above the baseline* (ltk/training/memory_watch.py): on a CPU the
interpreter and the torch libraries hold several hundred MB of RSS before a run builds anything,
which neither yardstick counts. The raw peak is reported beside it.
"""
from __future__ import annotations

from typing import Any

from ltk.training.config import RunConfig

FULL_STATE_BYTES_PER_PARAM = 16  # Adam: weights + gradients + two moments (ZeRO paper's K = 12, + 2 + 2)


def plan_for_run(cfg: RunConfig, world: int, dtype: str, seq_len: int) -> dict[str, Any]:
    """ltk/parallel/plan.py's plan for a run config at `world` ranks, with the run's resolved
    dtype and sequence length. Without a pipeline the plan's activations are one micro-batch
    (trainer.batch_size sequences over the dp ranks: gradient accumulation runs them one after
    the other); with one, the grad_accum micro-batches go through the schedule. A fine-tuning run
    (task instruct) gets the fine-tuning plan of its adapter (ltk/parallel/plan_finetune.py). Raises
    ValueError for a family or strategy the plan does not cover (bert, t5; zero1 with an adapter)."""
    from ltk.parallel.plan import plan

    p, t = cfg.parallel, cfg.trainer
    dp = world // (p.tp * p.pp * p.cp)
    strategy = p.strategy if p.strategy != "auto" else ("ddp" if dp * p.cp > 1 else "none")  # cp ranks reduce too
    batch = t.batch_size * t.grad_accum if p.pp > 1 else t.batch_size
    if cfg.task.kind == "instruct" and p.tp == p.pp == 1:  # fine-tuning: the frozen base, the adapters
        a = cfg.adapter
        return plan(cfg.family, cfg.model, world=world, strategy=strategy, batch=batch, seq_len=seq_len,
                    micro_batches=t.grad_accum, dtype=dtype, recompute=t.activation_checkpointing,
                    method="full" if a.method == "none" else a.method, lora_r=a.r, lora_targets=a.targets,
                    compute_dtype=a.compute_dtype)
    return plan(cfg.family, cfg.model, world=world, strategy=strategy, tp=p.tp, pp=p.pp, batch=batch,
                seq_len=seq_len, micro_batches=t.grad_accum, dtype=dtype, schedule=p.schedule,
                virtual=p.virtual_stages, sequence_parallel=p.sequence_parallel,
                recompute=t.activation_checkpointing, cp=p.cp, cp_impl=p.cp_impl,
                reshard_after_forward=p.reshard_after_forward,
                reduce_dtype=None if p.reduce_dtype == "auto" else p.reduce_dtype)


def compare(rank: dict[str, Any], plan_total: int | None, full: int) -> dict[str, Any]:
    """One rank's result (MemoryWatch.result) with, per phase and overall, the peak above the
    baseline and its ratios to the plan's per-rank total and to the full copy 16Ψ."""
    base = rank["baseline"]

    def ratios(peak: int) -> dict[str, Any]:
        above = peak - base
        return {"peak": peak, "above_baseline": above,
                "vs_plan": above / plan_total if plan_total else None, "vs_full_copy": above / full if full else None}

    whole = ratios(rank["peak"])
    return {**rank, "vs_plan": whole["vs_plan"], "vs_full_copy": whole["vs_full_copy"],
            "phases": {ph: ratios(v) for ph, v in rank["phases"].items()}}


def memory_report(ranks: list[dict[str, Any]], cfg: RunConfig, world: int, dtype: str, seq_len: int,
                  num_params: int) -> dict[str, Any]:
    """summary.json's "memory_per_rank": every rank's peaks beside the plan and 16Ψ."""
    full = FULL_STATE_BYTES_PER_PARAM * num_params
    out: dict[str, Any] = {
        "measure": ("torch.cuda.max_memory_allocated (baseline 0)" if ranks and ranks[0]["measure"] != "rss" else
                    "peak resident set size of the process (VmHWM), reset at each phase boundary; "
                    "baseline = RSS before the data and the model (interpreter, torch libraries)"),
        "compare": "peak above the baseline vs the plan's per-rank total and vs 16 bytes x parameters",
        "full_copy": full,
    }
    try:
        p = plan_for_run(cfg, world, dtype, seq_len)
        out["plan"] = {k: p[k] for k in ("strategy", "zero_stage", "dtype", "params", "grads", "optimizer",
                                         "activations", "total")}
        total = p["total"]
    except ValueError as e:  # a family or layout the plan does not model: say so, measure anyway
        out["plan"], total = {"error": str(e)}, None
    out["ranks"] = [compare(r, total, full) for r in ranks]
    return out
