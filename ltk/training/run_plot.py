"""loss.png: the picture of a run, drawn from its metrics.jsonl when the run ends (also when it was
interrupted or failed: the rows logged so far are what a person wants to look at then).

Training loss and validation loss against the optimizer step on the left axis, the learning
rate on a second axis at the right: a loss that stops falling when the warm-up ends, or that
jumps at the peak learning rate, reads off one picture. Drawn with matplotlib's Agg canvas on a
Figure of its own (no pyplot, no display, no global backend switched under a caller's feet).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PLOT_FILE = "loss.png"


def plot_at_end() -> bool:
    """Whether runs draw loss.png when they end: yes unless LTK_PLOT=0. Drawing costs about a
    second and a half in a fresh process (importing matplotlib is most of it), which a test suite
    of a few hundred tiny runs turns into minutes; it sets LTK_PLOT=0 outside the plot's own tests."""
    return os.environ.get("LTK_PLOT", "1") != "0"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_run(run_dir: str | Path) -> Path | None:
    """Write run_dir/loss.png from run_dir/metrics.jsonl; None (nothing written) without rows."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    fig = loss_figure(read_metrics(metrics) if metrics.is_file() else [], title=run_dir.name)
    if fig is None:
        return None
    path = run_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    return path


def loss_figure(rows: list[dict], title: str = ""):
    """The Figure of loss.png for metrics rows; None when no row has a training loss."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if not train:
        return None
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    lr = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = ax.plot(*zip(*train), lw=1, color="C0", label="training loss")
    if val:
        lines += ax.plot(*zip(*val), "o-", color="C1", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{title}: loss and learning rate".lstrip(": "))
    ax.grid(alpha=0.3)
    if lr:
        ax_lr = ax.twinx()
        lines += ax_lr.plot(*zip(*lr), "--", lw=1, color="C2", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    fig.tight_layout()
    return fig
