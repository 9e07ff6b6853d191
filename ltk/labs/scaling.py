"""Lab `scaling`: as the same training step spreads over 1, 2, 4, ... ranks, how much faster
does it get, strategy by strategy, where does the time go instead — and does the simulator
(ltk/parallel/simulator.py), calibrated on this machine, predict it?

    ltk lab run scaling --quick    # a small GPT on 1, 2 and 4 CPU processes (gloo)
    ltk lab run scaling            # GPT-2 124M shapes on 1, 2, 4, ... GPUs (NCCL), as many as there are

Every run is the training loop of `ltk train` (ltk/training/trainer.py) on the same data and the
same global batch (strong scaling: the work per step is fixed, each rank gets a share):
DDP, ZeRO-1/2/3, tensor (TP) and pipeline (PP, 1F1B) parallelism and, at 4 ranks, DP 2 x TP 2
and PP 2 x DP 2. Per run, over the timed steps (medians):

    step time        first rank's start to last rank's end (one shared clock)
    tokens/s         global tokens per step / step time
    efficiency       tokens/s(N) / (N · tokens/s(1)); on a CPU also against the cores the
                     processes can use, min(N, cores) · tokens/s(1)
    compute / comm / idle   the per-rank timeline (ltk/parallel/timeline.py), averaged over ranks:
                     exposed communication and waiting for peers (pipeline bubble, load imbalance)
    memory/device    model states (parameters, gradients, optimizer) of the largest rank

The prediction beside each row comes from `simulate` with a cluster calibrated here: the
compute rate one process reaches on this very step (the 1-rank run: model FLOPs / step time),
scaled by the matmul rate each rank keeps while N ranks compute at once (on a CPU, processes
beyond the cores time-share them), and the collectives' alpha-beta fitted from the median
call measured at each world size (`measure_calibration`). The error column is
(predicted − measured) / measured step time.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from ltk.labs.parallelism import lab_config, mesh_for, plan_strategy, prepare_lab_data, watch_held_bytes
from ltk.labs.registry import Lab
from ltk.labs.report import Report
from ltk.training.progress import progress

NAMES = ("ddp", "zero1", "zero2", "zero3", "tp", "pp", "dp2xtp2", "pp2xdp2")  # ltk/labs/parallelism.STRATEGIES


def lab_settings(quick: bool) -> dict:
    if quick:
        return dict(worlds=(1, 2, 4), model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch=8,
                    grad_accum=2, steps=5, vocab=2048, device="cpu")
    import torch

    gpus = torch.cuda.device_count()
    worlds = tuple(w for w in (1, 2, 4, 8) if w <= max(gpus, 1))
    return dict(worlds=worlds, model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), batch=16,
                grad_accum=4, steps=8, vocab=8192, device="cuda" if gpus >= 2 else "cpu")


def _worker(rank: int, world: int, s: dict, names: list[str], data_dir: str) -> list[dict]:
    import torch.distributed as dist

    from ltk.parallel.timeline import Timeline
    from ltk.training.trainer import Trainer

    out = []
    for name in progress(names, desc=f"scaling lab, {world} rank(s)", unit="strategy", active=rank == 0):
        layout = mesh_for(name, world) if world > 1 else ("none", 1, 1)
        if layout is None:
            continue
        strategy, tp, pp = layout
        trainer = Trainer(lab_config(s, strategy, tp, pp, data_dir, s["device"]))
        held = watch_held_bytes(trainer)
        trainer.train_step()  # warm-up: allocations, bucket layouts, optimizer state
        gemm = gemm_share(trainer.train_step) if world == 1 else None
        with Timeline(trainer.rt.device) as tl:
            for step in range(s["steps"]):
                if world > 1:
                    dist.barrier()  # every rank starts the step together
                tl.begin_step(step)
                trainer.train_step()
                tl.end_step()
            rows = tl.flush()
        out.append({"name": name, "world": world, "rank": rank, "tp": tp, "pp": pp, "dp": world // (tp * pp),
                    "strategy": strategy, "held": held["bytes"], "timeline": rows, "seq_len": trainer.seq_len,
                    "tokens_per_step": trainer.tokens_per_step,
                    "flops_per_step": trainer.flops_per_token * trainer.tokens_per_step,
                    "params": trainer.num_params, "gemm_share": gemm})
    return out


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product")


def gemm_share(step) -> float:
    """The share of one step's operator time (self CPU time, torch.profiler) spent in matrix
    products (and fused attention, made of them): compute-bound work, which keeps its rate when
    ranks share a host; the rest is mostly memory-bound (elementwise, norms, softmax, AdamW)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    gemm = sum(e.self_cpu_time_total for e in ops if any(k in e.key for k in GEMM_OPS))
    return gemm / total if total > 0 else 1.0


def summarise(results: list[list[dict]]) -> list[dict]:
    """One row per run from every rank's records: medians over steps, means over ranks."""
    from ltk.parallel.timeline import per_rank_means, step_times

    rows = []
    for i, r0 in enumerate(results[0]):
        tl = r0["timeline"]
        means = per_rank_means(tl)
        step = statistics.median(step_times(tl).values())
        row = {k: r0[k] for k in ("name", "world", "tp", "pp", "dp", "strategy", "seq_len", "tokens_per_step",
                                  "flops_per_step", "params", "gemm_share")}
        row.update(step_s=step, tokens_per_s=r0["tokens_per_step"] / step,
                   memory=max(sum(per_rank[i]["held"].values()) for per_rank in results),
                   **{k: statistics.fmean(m[k] for m in means) for k in ("compute", "comm", "idle")},
                   per_rank=means)
        rows.append(row)
    return rows


def calibrate(world: int, device: str):
    """Collectives as a step meets them (the median call) and the compute rate a rank keeps
    while all compute. A median that noise keeps from growing with the size cannot be fitted:
    then the fastest call (the link's capability) is used, and the report says so."""
    from ltk.parallel.calibration import measure_calibration

    sizes = (2**12, 2**18, 2**22, 2**24)
    try:
        cal = measure_calibration(world=world, sizes=sizes, repeats=7, statistic="median", device=device)
        return cal, "median"
    except ValueError:
        return measure_calibration(world=world, sizes=sizes, repeats=7, statistic="min", device=device), "min"


def predict(rows: list[dict], s: dict, calibrations: dict) -> None:
    """Add the calibrated simulator's step time, compute, exposed comm, bubble and model states
    to each row. The compute rate at N ranks is the single-process step's FLOP/s scaled by the
    matmul rate a rank keeps while N compute at once (time-shared cores, memory bandwidth); on
    a CPU a pipeline's ranks compete only while busy, m / (m + p − 1) of the step."""
    from dataclasses import replace

    from ltk.models.gpt import GPTConfig
    from ltk.parallel.calibration import Calibration, calibrated_cluster
    from ltk.parallel.cost import bubble_share_of_step
    from ltk.parallel.plan import plan
    from ltk.parallel.simulator import Strategy, simulate

    base = next(r for r in rows if r["world"] == 1)
    rate = base["flops_per_step"] / base["step_s"]  # FLOP/s one process reaches on this step
    m = GPTConfig(**{**s["model"], "vocab_size": s["vocab"], "bias": False, "dropout": 0.0})
    for r in rows:
        w = r["world"]
        cal = calibrations[w]
        # the rates a rank keeps while all work, never more than alone; on a CPU a pipeline rank
        # sleeps through its bubble and frees its core, so only the busy share of ranks compete.
        # The step's matmuls keep the matmul share, the rest the bandwidth share (time adds up).
        busy = 1.0 - bubble_share_of_step(r["pp"], s["grad_accum"]) if s["device"] == "cpu" else 1.0
        alone, g = calibrations[1], base["gemm_share"] if s["device"] == "cpu" else 1.0
        mm = min(1.0, cal.achieved_flops / alone.achieved_flops / busy)
        bw = min(1.0, cal.bandwidth / alone.bandwidth / busy) if cal.bandwidth and alone.bandwidth else mm
        cluster = replace(calibrated_cluster(cal, w), peak_flops=rate / (g / mm + (1 - g) / bw))
        zero = int(r["strategy"][-1]) if r["strategy"].startswith("zero") else 0
        st = Strategy(dp=r["dp"], tp=r["tp"], pp=r["pp"], zero=zero,
                      micro_batches=s["grad_accum"], global_batch=s["batch"] * s["grad_accum"], seq_len=r["seq_len"],
                      dtype="fp32" if s["device"] == "cpu" else "bf16", flash=s["device"] != "cpu")
        p = simulate(m, cluster, st, Calibration(efficiency=1.0, collectives=cal.collectives))
        states = plan("gpt", m, world=w, strategy=plan_strategy(r["strategy"], r["dp"]), tp=r["tp"], pp=r["pp"],
                      batch=st.global_batch if r["pp"] > 1 else s["batch"], seq_len=r["seq_len"],
                      micro_batches=s["grad_accum"], dtype="fp32")  # the largest rank's states: fp32 under autocast too
        r["pred"] = {"step_s": p.step_time, "compute": p.compute, "comm": sum(p.comm_exposed.values()),
                     "idle": p.bubble, "memory": states["params"] + states["grads"] + states["optimizer"],
                     "rate": cluster.peak_flops}
        r["error"] = (p.step_time - r["step_s"]) / r["step_s"]


def _term_errors(rows: list[dict]) -> dict[str, float]:
    """Median over the multi-rank runs of |simulated − measured| per term, as a share of the
    measured step: which part of the model is furthest off."""
    multi = [r for r in rows if r["world"] > 1] or rows
    return {k: statistics.median(abs(r["pred"][k] - r[k]) / r["step_s"] for r in multi)
            for k in ("compute", "comm", "idle")}


def explain(rows: list[dict], s: dict, cores: int | None, statistics_used: dict, seconds: float) -> str:
    """The report's prose: the simulator's error, term by term, and what the rows show. Every
    number is computed from the rows; on a CPU (cores given) the CPU-only effects are named."""
    errs = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    terms = _term_errors(rows)
    g = next(r for r in rows if r["world"] == 1)["gemm_share"]
    gemm = (f"{g:.0%} of its operator time in matrix products, profiled, which keep their rate when ranks "
            f"share the host, the rest memory-bound" if cores else "one GPU a rank")
    top = max((r for r in rows if r["world"] == max(x["world"] for x in rows)), key=lambda r: r["tokens_per_s"])
    ms = 1e3
    out = [f"""## The simulator against the measurement

Step time error over {len(rows)} runs: median {statistics.median(errs):.0%}, worst {worst['error']:+.0%}
({worst['name']} on {worst['world']} ranks). Calibrated on this machine with two things only: the single-process
step (its FLOP/s; {gemm}) and bare measurements at each world size (alpha-beta of the median
collective call per kind, and the matmul rate and streaming bandwidth a rank keeps while all work at
once); the rest is the model — compute split evenly over tp x pp,
DP buckets hidden under the last backward, tensor-parallel collectives on the critical path, the
pipeline schedule's bubble. Term by term (median |simulated − measured| over the multi-rank runs, as a
share of the step): compute {terms['compute']:.0%}, exposed comm {terms['comm']:.0%}, idle {terms['idle']:.0%}."""]
    fell_back = [w for w, st in statistics_used.items() if st == "min"]
    if fell_back:
        out.append(f"""
At {", ".join(map(str, fell_back))} rank(s) the median collective times were too noisy to fit (they did not grow
with the size), so the fastest calls were used: the link at its best, an optimistic figure.""")
    multi = [r for r in rows if r["world"] > 1]
    if cores and multi and max(r["world"] for r in multi) > cores:
        r = max(multi, key=lambda r: abs(r["pred"]["compute"] - r["compute"]) / r["step_s"])
        why = ("work the model does not count (gathers, bucket copies, hooks) and collectives running on the "
               "cores that compute" if r["compute"] > r["pred"]["compute"] else
               "a rank blocked in a collective also sleeps and frees its core, which the correction counts "
               "only for a pipeline's bubble")
        out.append(f"""
On this CPU up to {max(r['world'] for r in multi)} processes share {cores} cores and one memory. The rates
each keeps were measured with all working at once, and a pipeline rank, which sleeps through its bubble
and frees its core, counts as competing only m / (m + p − 1) of the step. The largest compute miss left
is {r['name']} on {r['world']} processes: {r['compute'] * ms:.0f} ms measured, {r['pred']['compute'] * ms:.0f} ms
predicted — {why}. On GPUs, one per rank, neither the sharing of cores nor the cycles collectives take
from compute arise.""")
    of_cores = (f" ({top['core_efficiency']:.0%} of what {cores} cores allow: processes beyond the cores "
                "time-share them)" if cores else "")
    on_cores = (" (with gloo on a CPU the collectives run on the cores that compute, so overlap is never free)"
                if cores else "")
    out.append(f"""
## What it shows

At {top['world']} ranks the fastest layout here is {top['name']} ({top['dp']}x{top['tp']}x{top['pp']}) at
{top['efficiency']:.0%} scaling efficiency{of_cores}.
Data parallelism keeps every rank computing whole layers; its exposed communication is what the
backward could not hide{on_cores}.
ZeRO-1/2/3 trade memory for traffic: the model states per device fall as the table's last column
shows, while ZeRO-3 gathers every layer's parameters twice per micro-batch. Tensor parallelism splits
every matmul into smaller ones and waits on four all-reduces per layer per micro-batch, nothing to hide
them under: its exposed-comm column is the largest. Pipeline parallelism moves the least, but its idle
column is the fill and drain bubble, (p − 1) / (m + p − 1) of the step with m = {s['grad_accum']} micro-batches.
Idle in DP and ZeRO runs is load imbalance: one rank a little late, the others waiting at the next
collective. The whole lab ran in {seconds:.0f} s.""")
    return "\n".join(out)


def _plot(rows: list[dict], cores: int | None):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    base = next(r for r in rows if r["world"] == 1)
    worlds = sorted({r["world"] for r in rows})
    for name in NAMES:
        pts = [base] + [r for r in rows if r["name"] == name and r["world"] > 1]
        if len(pts) > 1:
            a.plot([p["world"] for p in pts], [p["tokens_per_s"] for p in pts], "o-", label=name)
    a.plot(worlds, [base["tokens_per_s"] * w for w in worlds], "k--", lw=1, label="ideal (N x 1 rank)")
    if cores:
        a.plot(worlds, [base["tokens_per_s"] * min(w, cores) for w in worlds], "k:", lw=1, label=f"{cores} cores")
    a.set(xscale="log", yscale="log", xlabel="ranks", ylabel="tokens/s", title="throughput")
    a.set_xticks(worlds, [str(w) for w in worlds])
    a.xaxis.set_minor_formatter(NullFormatter())
    a.legend(fontsize=7)
    labels = [f"{r['name'] if r['world'] > 1 else 'single'}\n{r['world']}" for r in rows]
    left = [0.0] * len(rows)
    for kind, color in (("compute", "#4c72b0"), ("comm", "#dd8452"), ("idle", "#bbbbbb")):
        vals = [r[kind] * 1e3 for r in rows]
        b.bar(range(len(rows)), vals, bottom=left, color=color, label=kind)
        left = [x + y for x, y in zip(left, vals)]
    b.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    b.set(ylabel="ms per step (mean over ranks)", title="where the step goes (timeline)")
    b.legend(fontsize=7)
    meas, pred = [r["step_s"] * 1e3 for r in rows], [r["pred"]["step_s"] * 1e3 for r in rows]
    for w in worlds:
        c.scatter([m for m, r in zip(meas, rows) if r["world"] == w],
                  [p for p, r in zip(pred, rows) if r["world"] == w], label=f"{w} rank{'s' if w > 1 else ''}")
    lo, hi = min(meas + pred) * 0.8, max(meas + pred) * 1.2
    c.plot([lo, hi], [lo, hi], "k--", lw=1, label="simulated = measured")
    c.legend(fontsize=7)
    c.set(xscale="log", yscale="log", xlabel="measured step ms", ylabel="simulated step ms",
          title="simulator vs measurement")
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool) -> Path:
    from ltk.parallel.dist import spawn

    s = lab_settings(quick)
    data_dir = prepare_lab_data(s, out)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows, calibrations, statistics_used, t0 = [], {}, {}, time.perf_counter()
    for world in s["worlds"]:
        names = ["single"] if world == 1 else list(NAMES)
        results = spawn(_worker, world, s, names, data_dir, timeout_s=3600, device=s["device"])
        rows += summarise(results)
        calibrations[world], statistics_used[world] = calibrate(world, s["device"])
    predict(rows, s, calibrations)
    base = next(r for r in rows if r["world"] == 1)
    for r in rows:
        r["efficiency"] = r["tokens_per_s"] / (r["world"] * base["tokens_per_s"])
        r["core_efficiency"] = r["tokens_per_s"] / (min(r["world"], cores) * base["tokens_per_s"])
    errs = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    on_cpu = s["device"] == "cpu"
    rep = Report("Lab: scaling a training step over ranks",
                 "As one training step spreads over more ranks, how much faster does it get, strategy by strategy, "
                 "where does the time go, and does the calibrated simulator predict it?",
                 "ltk lab run scaling" + (" --quick" if quick else ""))
    ms, mib = 1e3, 2**20
    rep.table(["strategy", "ranks", "dp x tp x pp", "tokens/s",
               "efficiency" + (f" (vs {cores} cores)" if on_cpu else ""), "step ms measured / simulated (error)",
               "compute ms (meas / sim)", "exposed comm ms (meas / sim)", "idle ms (meas / sim bubble)",
               "model states MiB/device (meas / sim)"],
              [[r["name"] if r["world"] > 1 else "single process", r["world"], f"{r['dp']}x{r['tp']}x{r['pp']}",
                round(r["tokens_per_s"]),
                f"{r['efficiency']:.0%}" + (f" ({r['core_efficiency']:.0%})" if on_cpu else ""),
                f"{r['step_s'] * ms:.1f} / {r['pred']['step_s'] * ms:.1f} ({r['error']:+.0%})",
                f"{r['compute'] * ms:.1f} / {r['pred']['compute'] * ms:.1f}",
                f"{r['comm'] * ms:.1f} / {r['pred']['comm'] * ms:.1f}",
                f"{r['idle'] * ms:.1f} / {r['pred']['idle'] * ms:.1f}",
                f"{r['memory'] / mib:.2f} / {r['pred']['memory'] / mib:.2f}"] for r in rows],
              f"GPT {s['model']['n_layer']} x {s['model']['n_embd']}, {base['params']:,} parameters, global batch "
              f"{s['batch']} x {s['grad_accum']} micro-batches x {base['seq_len']} tokens, "
              f"{'fp32' if on_cpu else 'bf16 autocast'}, "
              f"{'CPU processes on gloo, ' + str(cores) + ' cores' if on_cpu else 'one GPU per rank, NCCL'}; "
              f"medians of {s['steps']} steps; compute/comm/idle are means over ranks of the per-rank timeline.")
    rep.plot("scaling", _plot(rows, cores if on_cpu else None), "throughput, time split and simulator vs measurement")
    rep.text(explain(rows, s, cores if on_cpu else None, statistics_used, time.perf_counter() - t0))
    rep.results.update({"settings": s, "cores": cores, "rows": rows,
                        "calibration": {w: {"collectives": c.collectives, "matmul_flops": c.achieved_flops,
                                            "bandwidth": c.bandwidth,
                                            "statistic": statistics_used[w]}
                                        for w, c in calibrations.items()},
                        "error_median": statistics.median(errs), "error_worst": worst["error"]})
    path = rep.write(out)
    print(f"\nreport: {path}")
    return path


LAB = Lab(
    name="scaling",
    question="As a step spreads over 1, 2, 4 ranks, how much faster is it per strategy, where does the time go, "
             "and does the calibrated simulator predict it?",
    run=run,
    quick_minutes=1.0,
)
