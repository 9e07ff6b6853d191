"""The picture of a timeline (ltk/parallel/timeline.py): a Gantt chart of the last recorded step,
one lane per rank — compute, exposed communication and idle as coloured spans on one time
axis — beside each rank's median split over all recorded steps."""
from __future__ import annotations

from pathlib import Path

COLORS = {"compute": "#4c72b0", "comm": "#dd8452", "idle": "#bbbbbb"}


def draw_step(ax, rank: int, step: dict, ready, t0: float) -> None:
    """One rank's step as a lane of a Gantt chart (ms from t0): the step as compute, with its
    exposed-communication and idle spans (timeline.split_step) drawn over it."""
    from ltk.parallel.timeline import split_step

    ax.broken_barh([((step["start"] - t0) * 1e3, (step["end"] - step["start"]) * 1e3)], (rank - 0.4, 0.8),
                   color=COLORS["compute"])
    for a, b, kind, _op in split_step(step, ready)["segments"]:
        ax.broken_barh([((a - t0) * 1e3, (b - a) * 1e3)], (rank - 0.4, 0.8), color=COLORS[kind])


def plot_timeline(window: list[list[dict]], rows: list[dict], path: str | Path, shared_clock: bool = True) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ltk.parallel.timeline import _ready_times, per_rank_means

    ready = _ready_times(window) if shared_clock else None
    fig, (gantt, bars) = plt.subplots(1, 2, figsize=(13, 1.8 + 0.6 * len(window)),
                                      gridspec_kw={"width_ratios": [3, 1]})
    lasts = [steps[-1] for steps in window if steps]
    t0 = min(s["start"] for s in lasts) if lasts else 0.0
    for rank, steps in enumerate(window):
        if not steps:
            continue
        draw_step(gantt, rank, steps[-1], ready, t0)
    gantt.set_yticks(range(len(window)), [f"rank {r}" for r in range(len(window))])
    gantt.invert_yaxis()
    gantt.set_xlabel("ms since the first rank began the step" if shared_clock else "ms since each rank's step start")
    gantt.set_title(f"step {lasts[-1]['step'] if lasts else '?'}: compute, exposed comm, idle")
    means = per_rank_means(rows)
    left = [0.0] * len(means)
    for kind in ("compute", "comm", "idle"):
        vals = [m[kind] * 1e3 for m in means]
        bars.barh([m["rank"] for m in means], vals, left=left, color=COLORS[kind], label=kind)
        left = [a + b for a, b in zip(left, vals)]
    bars.set_yticks([m["rank"] for m in means], [f"rank {m['rank']}" for m in means])
    bars.invert_yaxis()
    bars.set_xlabel("ms per step (median)")
    handles, labels = bars.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncol=3, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
