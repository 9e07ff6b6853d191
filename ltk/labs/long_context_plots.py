"""The long-context lab's figures: per-rank activations and step time against T (measured beside
the plan), and the load balance of the causal split — one step per rank on the timeline
(ltk/parallel/timeline.py: compute, exposed communication, idle) and each rank's attention time
beside its planned score tiles, contiguous against zig-zag."""
from __future__ import annotations

MIB = 2**20
STYLE = {("none", "-"): ("k", "s"), ("ring", "contiguous"): ("C3", "v"), ("ring", "zigzag"): ("C0", "o"),
         ("ulysses", "zigzag"): ("C2", "D")}


def series_label(impl: str, layout: str, cp: int) -> str:
    return "no CP" if impl == "none" else f"{impl} {layout} N={cp}"


def plot_growth(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, (mem, step) = plt.subplots(1, 2, figsize=(12, 4.4))
    for key in dict.fromkeys((r["impl"], r["layout"], r["cp"]) for r in rows):
        pts = sorted((r for r in rows if (r["impl"], r["layout"], r["cp"]) == key), key=lambda r: r["T"])
        color, marker = STYLE[key[:2]]
        dash = {1: "-", 2: "--", 4: ":"}.get(key[2], "-.")
        Ts = [r["T"] for r in pts]
        if key[1] != "contiguous":  # the same shards as zig-zag: the same memory, one line is enough
            mem.plot(Ts, [r["plan_activations"] / MIB for r in pts], dash, color=color, alpha=0.6)
            mem.plot(Ts, [r["saved"] / MIB for r in pts], marker, color=color, mfc="none",
                     label=series_label(*key))
        timed = [r for r in pts if r["step_s"] is not None]
        key_t = "cpu_s" if timed and timed[0]["cpu_s"] is not None else "step_s"
        step.plot([r["T"] for r in timed], [r[key_t] * 1e3 for r in timed], dash, marker=marker, color=color,
                  label=series_label(*key))
    mem.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="activations per rank (MiB)",
            title="saved activations: measured (markers), plan (lines)")
    cpu = any(r["cpu_s"] is not None for r in rows)
    step.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="forward + backward (ms)",
             title="step CPU time, busiest rank (median)" if cpu else "step time (median, slowest rank)")
    for ax in (mem, step):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_balance(rows: list[dict], cp: int, T: int):
    """Rows: contiguous, zig-zag. Left: the last timed step of every rank (wall clock, shared
    host clock: idle = waiting for a slower peer). Right: attention seconds per rank (bars) and
    the planned tiles (dots, right axis)."""
    import matplotlib.pyplot as plt

    from ltk.parallel.timeline import _ready_times
    from ltk.parallel.timeline_plot import COLORS, draw_step

    fig, axes = plt.subplots(2, 2, figsize=(13, 2.2 + 1.1 * cp), gridspec_kw={"width_ratios": [3, 1.3]})
    for (gantt, bars), layout in zip(axes, ("contiguous", "zigzag")):
        r = next((x for x in rows if (x["impl"], x["layout"], x["cp"], x["T"]) == ("ring", layout, cp, T)), None)
        if r is None or not r["window"]:
            gantt.set_title(f"ring {layout}: not measured")
            continue
        window = r["window"]
        ready = _ready_times(window)
        t0 = min(steps[0]["start"] for steps in window if steps)
        for rank, steps in enumerate(window):
            draw_step(gantt, rank, steps[0], ready, t0)
        gantt.set_yticks(range(len(window)), [f"rank {k}" for k in range(len(window))])
        gantt.invert_yaxis()
        gantt.set(xlabel="ms since the first rank began the step",
                  title=f"ring, {layout} split, N = {cp}, T = {T:,}: compute (blue), exposed comm (orange), "
                        "idle = waiting (grey)")
        ranks = range(len(r["attn_s"]))
        bars.barh(list(ranks), [a * 1e3 for a in r["attn_s"]], color=COLORS["compute"], label="attention (measured)")
        bars.set_yticks(list(ranks), [f"rank {k}" for k in ranks])
        bars.invert_yaxis()
        bars.set_xlabel("attention ms per step (measured)")
        tiles = bars.twiny()
        tiles.plot(r["plan_tiles"], list(ranks), "o", color="k", label="score tiles (plan)")
        tiles.set_xlim(0, max(r["plan_tiles"]) * 1.15)
        tiles.set_xlabel("score tiles per step (plan, dots)")
    fig.tight_layout()
    return fig
