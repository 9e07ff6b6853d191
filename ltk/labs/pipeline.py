"""Lab `pipeline`: how does the pipeline bubble shrink with the number of micro-batches for
GPipe, 1F1B and interleaved 1F1B — measured on real processes, beside the simulator and the
formula?

    ltk lab run pipeline --quick     # p = 2 CPU processes (gloo), a 4-layer GPT, m = 2, 4, 8 (about a minute)
    ltk lab run pipeline             # p = 4 processes (GPUs when there are 4), 8 layers, m up to 16

Each rank runs its share of the schedule (ltk/parallel/pipeline.py) and times what it does: forward
and backward compute, time blocked in a receive, and the rest of the step (waiting for its
sends to complete, the tied-embedding all-reduce). The measured bubble of a rank is everything
but compute over compute — what the simulator calls idle over busy. Three numbers:

    formula     (p−1)/m, or (p−1)/(v·m) interleaved     (Narayanan et al. 2021, §2.2; ltk/parallel/cost.py)
    simulated   ltk/parallel/pipeline_sim.py fed the forward and backward times this very step
                measured, per chunk (so unequal stages, e.g. the head on the last one, count),
                and the one-way time of one activation message, measured by ping-pong
    measured    the ranks' waiting time over their compute time

The simulator charges every message its measured one-way time but not the receiving rank's
own share of the work of a transfer (on a CPU, gloo's copies run on the same cores as the
compute); the rest of the gap is the noise of a shared machine. Peak activations in flight per rank (1F1B
keeps at most p, GPipe all m) come from the schedule itself.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from ltk.labs.registry import Lab
from ltk.labs.report import Report
from ltk.training.progress import progress, ticking

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))


def lab_settings(quick: bool) -> dict:
    if quick:
        return dict(stages=2, micro=(2, 4, 8), n_layer=4, n_embd=384, n_head=6, seq=128, rows_per_micro=8,
                    vocab=512, steps=3)
    return dict(stages=4, micro=(4, 8, 16), n_layer=8, n_embd=512, n_head=8, seq=256, rows_per_micro=4,
                vocab=8192, steps=5)


def _worker(rank: int, world: int, s: dict) -> list[dict]:
    """One rank: for every schedule and m, a warm-up step then `steps` timed steps."""
    import torch

    from ltk.models.gpt import GPT, GPTConfig
    from ltk.parallel.pipeline import PipelineComms, PipelineTrainer
    from ltk.parallel.schedules import make_schedule

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=s["vocab"], block_size=s["seq"], n_layer=s["n_layer"], n_head=s["n_head"],
                          n_embd=s["n_embd"], bias=False, backend="torch"))
    comms = PipelineComms.build()
    p2p = _p2p_seconds(rank, (s["rows_per_micro"], s["seq"], s["n_embd"]))
    g = torch.Generator().manual_seed(1)
    out = []
    bar = progress(total=len(SCHEDULES) * len(s["micro"]), desc="pipeline lab", unit="setting", active=rank == 0)
    for name, v in SCHEDULES:
        for m in ticking(s["micro"], bar):
            sched = make_schedule(name, world, m, v)
            trainer = PipelineTrainer(model, sched, comms, lr=1e-4)
            tok = torch.randint(0, s["vocab"], (m * s["rows_per_micro"], s["seq"] + 1), generator=g)
            x, y = tok[:, :-1], tok[:, 1:]
            trainer.forward_backward(x, y)  # warm-up
            for _ in range(s["steps"]):
                _, tm = trainer.forward_backward(x, y)  # the schedule alone: no optimizer step in the timing
                trainer.opt.zero_grad(set_to_none=True)
                out.append({"schedule": name, "virtual": v, "m": m, "rank": rank, "forward": tm.forward,
                            "backward": tm.backward, "wait": tm.wait, "other": tm.other, "p2p_s": p2p})
    bar.close()
    return out


def _p2p_seconds(rank: int, shape: tuple, trips: int = 20) -> float:
    """One-way time of one activation message between ranks 0 and 1 (ping-pong, median)."""
    import statistics as st
    import time

    import torch
    import torch.distributed as dist

    buf, times = torch.zeros(shape), []
    for _ in range(trips):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - t0) / 2)
    t = torch.tensor([st.median(times) if rank == 0 else 0.0], dtype=torch.float64)
    dist.broadcast(t, 0)  # every rank uses rank 0's estimate
    return float(t)


def _summarize(rows: list[dict], p: int) -> list[dict]:
    from ltk.parallel.cost import bubble_fraction
    from ltk.parallel.pipeline import StepTimings, simulated_bubble
    from ltk.parallel.pipeline_sim import peak_in_flight
    from ltk.parallel.schedules import make_schedule

    table = []
    keys = sorted({(r["schedule"], r["virtual"], r["m"]) for r in rows}, key=lambda k: (k[0], k[2]))
    for name, v, m in keys:
        these = [r for r in rows if (r["schedule"], r["virtual"], r["m"]) == (name, v, m)]
        by_rank = [[r for r in these if r["rank"] == k] for k in range(p)]  # each in step order
        sched = make_schedule(name, p, m, v)
        measured, simulated = [], []
        for i in range(len(by_rank[0])):  # step i, as every rank timed it
            tms = [StepTimings(**{k: by_rank[j][i][k] for k in ("forward", "backward", "wait", "other")})
                   for j in range(p)]
            # idle = blocked in a receive + waiting for sends to finish at the end: what the
            # simulator calls idle (makespan − busy); over the rank's compute
            measured.append(statistics.mean((t.wait + t.other) / (t.forward + t.backward) for t in tms))
            simulated.append(statistics.mean(simulated_bubble(sched, tms, by_rank[0][i]["p2p_s"])))
        table.append({"schedule": name, "virtual": v, "m": m, "formula": bubble_fraction(p, m, v),
                      "simulated": statistics.median(simulated), "measured": statistics.median(measured),
                      "peak_in_flight": peak_in_flight(sched)})
    return table


def _plot(table: list[dict], p: int):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(sorted({t["schedule"] for t in table})):
        pts = [t for t in table if t["schedule"] == name]
        ms = [t["m"] for t in pts]
        ax.plot(ms, [t["formula"] for t in pts], "-", color=f"C{i}", label=f"{name}: formula")
        ax.plot(ms, [t["simulated"] for t in pts], "s", mfc="none", color=f"C{i}", label=f"{name}: simulated")
        ax.plot(ms, [t["measured"] for t in pts], "o", color=f"C{i}", label=f"{name}: measured")
    ax.set(xscale="log", xlabel="micro-batches per step (m)", ylabel="bubble (idle / compute)",
           title=f"Pipeline bubble, p = {p}")
    ms = sorted({t["m"] for t in table})
    ax.set_xticks(ms, labels=[str(m) for m in ms])
    ax.xaxis.set_minor_formatter(NullFormatter())  # the m values only: log-scale minor labels would crowd them
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool) -> Path:
    from ltk.parallel.dist import spawn

    s = lab_settings(quick)
    p = s["stages"]
    rows = [r for per_rank in spawn(_worker, p, s, timeout_s=1800) for r in per_rank]
    table = _summarize(rows, p)
    rep = Report("Lab: the pipeline bubble", "How does the pipeline bubble shrink with the number of micro-batches "
                 "for GPipe, 1F1B and interleaved 1F1B, measured beside the simulator and the formula?",
                 "ltk lab run pipeline" + (" --quick" if quick else ""))
    rep.table(["schedule", "v", "m", "formula (p−1)/(v·m)", "simulated", "measured", "measured / simulated",
               "peak activations in flight per rank"],
              [[t["schedule"], t["virtual"], t["m"], round(t["formula"], 3), round(t["simulated"], 3),
                round(t["measured"], 3), round(t["measured"] / t["simulated"], 2) if t["simulated"] else "—",
                str(t["peak_in_flight"])] for t in table],
              f"p = {p} ranks; GPT {s['n_layer']} layers x {s['n_embd']}, {s['rows_per_micro']} rows of {s['seq']} "
              f"tokens per micro-batch; medians over {s['steps']} steps after a warm-up; bubble = idle / compute.")
    rep.plot("bubble", _plot(table, p), "bubble against m: formula (lines), simulated (squares), measured (dots)")
    err = [abs(t["measured"] - t["simulated"]) / t["simulated"] for t in table if t["simulated"] > 0]
    table_p2p = rows[0]["p2p_s"]
    rep.text(f"""## What it shows

More micro-batches shrink the bubble as 1/m: the pipeline fills and drains once per step,
(p−1) stage-times at each end, however many micro-batches pass through. GPipe and 1F1B have
the same bubble; 1F1B's gain is memory — a rank holds at most p micro-batches of activations
instead of m (last column). Interleaving v chunks per rank makes each stage-time v times
shorter, so the fill and drain cost v times less, at the price of v times more messages.

The simulator, fed the compute times each rank measured and the measured message time
({table_p2p * 1e3:.2f} ms one way), predicts the measured bubble within a median
{statistics.median(err):.0%} here (worst {max(err):.0%}); on a shared CPU the ranks also compete
for cores with each other and with gloo's copies, which it does not model. The formula assumes equal
stages; the last stage also runs the head and the loss, which the simulator accounts for.""")
    rep.results.update({"settings": s, "table": table, "rows": rows,
                        "median_relative_error_vs_simulated": statistics.median(err)})
    path = rep.write(out)
    print(f"\nreport: {path}")
    return path


LAB = Lab(
    name="pipeline",
    question="How does the pipeline bubble shrink with the micro-batch count for GPipe, 1F1B and interleaved, "
             "measured beside simulated?",
    run=run,
    quick_minutes=1.2,
)
