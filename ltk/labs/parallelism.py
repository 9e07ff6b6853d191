"""Lab `parallelism`: on one model and one global batch, what does each way of splitting the
work cost — step time, memory per rank, and bytes moved — and does the cost model agree?

    ltk lab run parallelism --quick    # gpt-debug-sized GPT, 2 and 4 CPU processes (gloo)
    ltk lab run parallelism            # GPT-2 124M shapes on 4 processes (GPUs when there are 4)

Every strategy runs the training loop of `ltk train` (ltk/training/trainer.py) in fresh processes
on the same data: DDP (ours and PyTorch's), ZeRO-1/2/3, tensor parallelism (TP), pipeline
parallelism (PP, 1F1B) and, at 4 ranks, DP 2 x TP 2 and PP 2 x DP 2. Per strategy:

    step time      median over the timed steps, slowest rank (a step ends when every rank is done)
    tokens/s       global batch tokens / step time
    memory         model-state bytes rank 0 holds between backward and the optimizer step
                   (parameters, gradients, optimizer states; each storage once) beside
                   ltk/parallel/plan.py's prediction for the largest rank
    bytes moved    payload the busiest rank sends in one step (ltk/parallel/dist.py counts every
                   collective; a receive is the peer's send, not counted twice) beside the plan's
                   data-, tensor- and pipeline-parallel traffic

On a 2-core CPU the processes share the cores, so step times say little about scaling; memory
and bytes are exact on any machine.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ltk.labs.registry import Lab
from ltk.labs.report import Report
from ltk.training.progress import progress

# name -> (strategy, tp, pp) as fractions of the world ("w" = the whole world)
STRATEGIES = {
    "torch-ddp": ("torch-ddp", 1, 1), "ddp": ("ddp", 1, 1), "zero1": ("zero1", 1, 1), "zero2": ("zero2", 1, 1),
    "zero3": ("zero3", 1, 1), "tp": ("auto", "w", 1), "pp": ("auto", 1, "w"),
    "dp2xtp2": ("ddp", 2, 1), "pp2xdp2": ("ddp", 1, 2),
}


def lab_settings(quick: bool) -> dict:
    if quick:
        return dict(worlds=(2, 4), model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), batch=8, grad_accum=2,
                    steps=4, vocab=2048)
    return dict(worlds=(4,), model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), batch=8, grad_accum=4,
                steps=10, vocab=8192)


def mesh_for(name: str, world: int) -> tuple[str, int, int] | None:
    """(engine, tp, pp) of strategy `name` on `world` ranks, or None where it does not fit."""
    strategy, tp, pp = STRATEGIES[name]
    tp, pp = (world if tp == "w" else tp), (world if pp == "w" else pp)
    if world % (tp * pp) or (name in ("dp2xtp2", "pp2xdp2") and world != 4):
        return None
    return strategy, tp, pp


def plan_strategy(strategy: str, dp: int) -> str:
    """The name ltk/parallel/plan.py knows for an engine: "auto" (pure TP or PP) is DDP over the
    data-parallel ranks, or no data parallelism at all."""
    return strategy if strategy != "auto" else ("ddp" if dp > 1 else "none")


def lab_config(s: dict, strategy: str, tp: int, pp: int, data_dir: str, device: str = "cpu"):
    """The run config every rank builds: gpt-debug with the lab's model and batch settings."""
    from ltk.training.presets import get_preset

    cfg = get_preset("gpt-debug")
    for k, v in s["model"].items():
        setattr(cfg.model, k, v)
    cfg.model.bias, cfg.model.dropout, cfg.model.backend = False, 0.0, "torch"
    cfg.data.vocab_size, cfg.data.max_bytes = s["vocab"], s.get("max_bytes", cfg.data.max_bytes)
    cfg.data.cache_dir = data_dir
    cfg.trainer.batch_size, cfg.trainer.grad_accum = s["batch"], s["grad_accum"]
    cfg.trainer.max_steps, cfg.trainer.progress, cfg.trainer.seq_len = 100, False, 0
    cfg.trainer.device = device
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.pp = strategy, tp, pp
    return cfg


def watch_held_bytes(trainer) -> dict:
    """A dict whose "bytes" is refreshed every step with held_bytes at the moment gradients
    exist (between backward and the optimizer step; Adam's state exists after the first)."""
    held: dict = {}
    clip = trainer.par.clip_grad_norm_

    def clip_and_count(max_norm):
        held["bytes"] = held_bytes(trainer.par)
        return clip(max_norm)

    trainer.par.clip_grad_norm_ = clip_and_count
    return held


def prepare_lab_data(s: dict, out: Path) -> str:
    """Build the lab's dataset once, before the processes start; returns its cache folder."""
    from ltk.training.data import prepare_data
    from ltk.training.presets import get_preset

    data_dir = str(out / "data")
    cfg = get_preset("gpt-debug")
    cfg.data.vocab_size, cfg.data.cache_dir = s["vocab"], data_dir
    cfg.data.max_bytes = s.get("max_bytes", cfg.data.max_bytes)
    prepare_data(cfg.data)
    return data_dir


def held_bytes(run) -> dict[str, int]:
    """Parameters, gradients and optimizer states this rank holds (each storage once)."""
    import torch

    engine = getattr(run, "engine", None)
    if engine is not None and hasattr(engine, "state_bytes"):
        return engine.state_bytes()
    modules = run.chunks if hasattr(run, "chunks") else [run.model]
    seen: set[int] = set()

    def total(tensors) -> int:
        out = 0
        for t in tensors:
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out += st.nbytes()
        return out

    params = [p for m in modules for p in m.parameters()]
    grads = list(getattr(engine, "buffers", [])) or [p.grad for p in params if p.grad is not None]
    opt = [v for st in run.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": total(params), "grads": total(grads), "optimizer": total(opt)}


def _worker(rank: int, world: int, s: dict, names: list[str], data_dir: str) -> list[dict]:
    import torch.distributed as dist

    from ltk.parallel.dist import STATS
    from ltk.parallel.plan import plan
    from ltk.training.trainer import Trainer

    out = []
    for name in progress(names, desc=f"parallelism lab, {world} ranks", unit="strategy", active=rank == 0):
        layout = mesh_for(name, world)
        if layout is None:
            continue
        strategy, tp, pp = layout
        trainer = Trainer(lab_config(s, strategy, tp, pp, data_dir))
        cfg = trainer.cfg
        held = watch_held_bytes(trainer)
        trainer.train_step()  # warm-up (allocations, first bucket layouts)
        times = []
        for _ in range(s["steps"]):
            STATS.reset()
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            dist.barrier()  # the step is over when the slowest rank is
            times.append(time.perf_counter() - t0)
        # what this rank sends: a receive moves nothing new (it is the peer's send)
        sent = {k: v for k, v in STATS.snapshot()["payload_bytes"].items() if k != "recv"}
        m = cfg.model
        dp = world // (tp * pp)
        p = plan("gpt", m, world=world, strategy=plan_strategy(strategy, dp), tp=tp, pp=pp,
                 batch=s["batch"] * s["grad_accum"] if pp > 1 else s["batch"], seq_len=trainer.seq_len,
                 micro_batches=s["grad_accum"], dtype="fp32")
        out.append({"name": name, "world": world, "rank": rank, "tp": tp, "pp": pp, "dp": world // (tp * pp),
                    "step_s": statistics.median(times), "tokens_per_step": trainer.tokens_per_step,
                    "held": held["bytes"], "comm": sent, "comm_total": sum(sent.values()),
                    "plan": {k: p[k] for k in ("params", "grads", "optimizer", "comm_bytes_per_step")},
                    "plan_comm": p["comm"], "params": trainer.num_params})
    return out


def _mib(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _plot(rows: list[dict]):
    """One group of bars per strategy, one bar per world size. A value that was not measured
    (None) gets no bar, only "n/m" where the bar would stand; a strategy that does not fit a
    world size (DP 2 x TP 2 on 2 ranks) gets nothing."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in rows))
    worlds = sorted({r["world"] for r in rows})
    width = 0.8 / len(worlds)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title, ylabel in (
            (axes[0], "tokens_per_s", "throughput", "tokens/s"),
            (axes[1], "mem_mib", "model states (rank 0)", "MiB per rank"),
            (axes[2], "comm_mib", "bytes moved per step (busiest rank)", "MiB per step")):
        for i, world in enumerate(worlds):
            at = {r["name"]: r[key] for r in rows if r["world"] == world}
            x = {n: j - 0.4 + width * (i + 0.5) for j, n in enumerate(names) if n in at}
            done = [n for n in x if at[n] is not None]
            ax.bar([x[n] for n in done], [at[n] for n in done], width=width, color=f"C{i}", label=f"{world} ranks")
            for n in (n for n in x if at[n] is None):  # x in data units, y in axes units: just above the axis
                ax.text(x[n], 0.02, "n/m", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", fontsize=8, color=f"C{i}")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set(title=title, ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool) -> Path:
    from ltk.parallel.dist import spawn

    s = lab_settings(quick)
    data_dir = prepare_lab_data(s, out)
    rows = []
    for world in s["worlds"]:
        results = spawn(_worker, world, s, list(STRATEGIES), data_dir, timeout_s=3600)
        for i, r0 in enumerate(results[0]):  # rank 0's memory; the busiest rank's traffic (as the plan)
            busiest = max((per_rank[i] for per_rank in results), key=lambda r: r["comm_total"])
            r0["comm"], r0["comm_total"] = busiest["comm"], busiest["comm_total"]
            r0["tokens_per_s"] = r0["tokens_per_step"] / r0["step_s"]
            # PyTorch's DDP keeps its buckets and collectives inside its reducer, where neither the
            # state count nor ltk/parallel/dist.py's counters reach: not measured (None), never 0
            measured = r0["name"] != "torch-ddp"
            r0["mem_mib"] = sum(r0["held"].values()) / 2**20 if measured else None
            r0["comm_mib"] = r0["comm_total"] / 2**20 if measured else None
            rows.append(r0)
    mib = 2**20
    table = []
    for r in rows:
        pm = sum(r["plan"][k] for k in ("params", "grads", "optimizer")) / mib
        pc = r["plan"]["comm_bytes_per_step"] / mib
        table.append([r["name"], r["world"], f"{r['dp']}x{r['tp']}x{r['pp']}", round(r["step_s"] * 1000, 1),
                      round(r["tokens_per_s"]), f"{_mib(r['mem_mib'])} / {pm:.2f}", f"{_mib(r['comm_mib'])} / {pc:.2f}",
                      "not counted (PyTorch's own)" if r["comm_mib"] is None else
                      ", ".join(f"{k} {v / mib:.2f}" for k, v in sorted(r["comm"].items()))])
    rep = Report("Lab: ways to split a training step", "On one model and one global batch, what does each strategy "
                 "cost in step time, memory per rank and bytes moved, and does the cost model agree?",
                 "ltk lab run parallelism" + (" --quick" if quick else ""))
    rep.table(["strategy", "ranks", "dp x tp x pp", "step ms", "tokens/s", "model states MiB (measured / plan)",
               "MiB moved per step (measured / plan)", "by collective (MiB)"], table,
              f"GPT {s['model']['n_layer']} x {s['model']['n_embd']}, {rows[0]['params']:,} parameters, global batch "
              f"{s['batch']} x {s['grad_accum']} micro-batches, fp32; rank 0's memory, the busiest rank's traffic; "
              f"medians of {s['steps']} steps; — : not measured.")
    rep.plot("parallelism", _plot(rows), "throughput, memory and traffic by strategy")
    rep.text("""## What it shows

Data parallelism (DDP, ZeRO) keeps every rank busy with whole layers and pays in gradient
traffic once per step: DDP and ZeRO-1/2 move the same bytes, ZeRO-3 half as much again,
while ZeRO shrinks the model states per rank. Tensor parallelism splits every matrix, so
memory falls by the TP degree, but it moves activations, four all-reduces per layer per
micro-batch, which is why it stays inside a node. Pipeline parallelism moves the least (one
activation per stage boundary per micro-batch) but idles during fill and drain (the
`pipeline` lab). The plan's traffic leaves out a few scalars (the loss and the gradient norm
all-reduced each step), which is the small gap between the two columns.""")
    rep.results.update({"settings": s, "rows": rows})
    path = rep.write(out)
    print(f"\nreport: {path}")
    return path


LAB = Lab(
    name="parallelism",
    question="On one model, what does each strategy (DDP, ZeRO, TP, PP and combinations) cost in time, memory "
             "and bytes?",
    run=run,
    quick_minutes=0.75,
)
