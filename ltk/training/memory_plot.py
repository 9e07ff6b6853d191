"""The picture of a memory trace (ltk/training/memory_watch.py): every rank's memory above its
baseline over the run, one line per rank on one wall clock, with the exact peak of each phase as
a dot where the phase ends (what the sampling interval could miss), the phases shaded (init, eval,
save; train unshaded), and horizontal lines for the plan's per-rank total, 1.25x it, and one full
copy of the model states (16Ψ). Drawn on a matplotlib Figure of its own (Agg canvas)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ltk.training.memory_watch import read_trace

SHADE = {"init": "#c7d7ec", "eval": "#cde8c5", "save": "#f4d3b0"}
GIB = 2**30


def read_traces(folder: str | Path) -> dict[int, dict[str, Any]]:
    """rank -> its trace, for every memory/rank{r}.jsonl in `folder`."""
    out = {}
    for p in Path(folder).glob("rank*.jsonl"):
        if p.stem[4:].isdigit():
            out[int(p.stem[4:])] = read_trace(p)
    return dict(sorted(out.items()))


def phase_spans(trace: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, phase) of each phase of one rank: a phase runs from the previous phase's end
    (the baseline for init) to its own; a phase a kill cut short ends at the last sample."""
    prev = trace["baseline"][0] if trace["baseline"] else None
    spans = []
    for t, _, phase in trace["ends"]:
        if prev is not None:
            spans.append((prev, t, phase))
        prev = t
    late = [s for s in trace["samples"] if prev is None or s[0] > prev]
    if late:
        spans.append((prev if prev is not None else late[0][0], late[-1][0], late[-1][2]))
    return spans


def plot_memory(folder: str | Path, path: str | Path, report: dict[str, Any] | None = None,
                title: str | None = None) -> Path:
    """Draw the traces in `folder` to `path`. `report`: a summary's "memory_per_rank" (or the
    bench's result) for the plan's total ("plan": {"total"}) and the full copy ("full_copy")."""
    from matplotlib.figure import Figure  # a figure of its own: no pyplot, no global backend switched

    traces = read_traces(folder)
    if not traces:
        raise FileNotFoundError(f"no memory trace (rank*.jsonl) in {folder}: run with --trainer.memory_trace true")
    t0 = min(tr["baseline"][0] if tr["baseline"] else tr["samples"][0][0] for tr in traces.values() if
             tr["baseline"] or tr["samples"])
    fig = Figure(figsize=(11, 5))
    ax = fig.add_subplot()
    first = traces[min(traces)]
    shaded = set()
    for a, b, phase in phase_spans(first):
        if phase in SHADE:
            ax.axvspan(a - t0, b - t0, color=SHADE[phase], alpha=0.6, lw=0,
                       label=f"{phase} (rank {min(traces)})" if phase not in shaded else None)
            shaded.add(phase)
    for rank, tr in traces.items():
        base = tr["baseline"][1] if tr["baseline"] else 0
        xs = [t - t0 for t, _, _ in tr["samples"]]
        ys = [(b - base) / GIB for _, b, _ in tr["samples"]]
        line, = ax.plot(xs, ys, lw=1.2, label=f"rank {rank}")
        ax.plot([t - t0 for t, _, _ in tr["ends"]], [(p - base) / GIB for _, p, _ in tr["ends"]], "o", ms=4,
                color=line.get_color())
    report = report or {}
    plan_total = (report.get("plan") or {}).get("total")
    if plan_total:
        ax.axhline(plan_total / GIB, color="k", ls="-", lw=1, label=f"plan per rank {plan_total / GIB:.2f} GiB")
        ax.axhline(1.25 * plan_total / GIB, color="k", ls=":", lw=1, label="1.25 x plan")
    if report.get("full_copy"):
        full = report["full_copy"]
        ax.axhline(full / GIB, color="#c44e52", ls="--", lw=1.2, label=f"full model states 16Ψ {full / GIB:.2f} GiB")
    ax.set_xlabel("seconds since the first rank's baseline (dots: each phase's exact peak, at its end)")
    ax.set_ylabel("GiB above the process's baseline")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "memory per rank over the run")
    ax.legend(fontsize=8, loc="upper left", ncol=2, framealpha=0.9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
