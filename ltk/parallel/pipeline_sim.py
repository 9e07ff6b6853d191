"""An event-driven simulator of a pipeline schedule: the timeline, the bubble and the
activation memory of ltk/parallel/schedules.py's execution model, without running a model.

Each rank runs its actions in order; an action starts when its rank is free and its input has
arrived (sends are asynchronous, so nothing else waits):

    start(a) = max(end(previous action on the rank), end(producer(a)) + latency)
    end(a)   = start(a) + t_F[stage] or t_B[stage]

with latency only between different ranks. The step ends at the makespan T = max end. Rank r is
busy B_r = Σ its compute times and idle T - B_r; the bubble fraction is idle over ideal time,

    bubble = Σ_r (T - B_r) / Σ_r B_r

which with equal stage times t_F, t_B (per chunk: a stage's time / v) is (Narayanan et al. 2021
§2.2): GPipe and 1F1B T = (m + p - 1)(t_F + t_B), bubble (p-1)/m; interleaved with v chunks
per rank T = (v·m + p - 1)(t_F + t_B), bubble (p-1)/(v·m) — the figures
ltk/parallel/cost.py.bubble_fraction gives.

Activation memory: a forward stores its activations until its backward frees them, so the
number in flight on a rank is #F started - #B finished; its peak depends only on the order:
GPipe m, 1F1B p - r on rank r (the point of 1F1B: p, not m), interleaved up to
2(p-1) + (v-1)·p + 1 chunk activations of L/(p·v) layers each. Peak activation memory =
peak in flight × bytes of one micro-batch's activations for one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ltk.parallel.schedules import Action, Schedule, execution_order


@dataclass(frozen=True)
class Event:
    rank: int
    action: Action
    stage: int
    start: float
    end: float


@dataclass
class SimResult:
    schedule: Schedule
    events: list[list[Event]]  # per rank, in execution order
    makespan: float
    busy: list[float]  # compute time per rank
    peak_in_flight: list[int]  # per rank, in (micro-batch, chunk) activations

    @property
    def idle(self) -> list[float]:
        return [self.makespan - b for b in self.busy]

    @property
    def bubble_per_rank(self) -> list[float]:
        return [i / b for i, b in zip(self.idle, self.busy)]

    @property
    def bubble_fraction(self) -> float:
        """Σ idle / Σ ideal compute (the (p-1)/m of ltk/parallel/cost.py with equal times)."""
        return sum(self.idle) / sum(self.busy)

    def peak_activation_bytes(self, bytes_per_chunk_activation: float) -> list[float]:
        """Per rank: peak in flight × bytes one micro-batch's activations take in one chunk."""
        return [n * bytes_per_chunk_activation for n in self.peak_in_flight]


def _per_stage(t: float | Sequence[float], n: int, name: str) -> list[float]:
    vals = [float(t)] * n if isinstance(t, (int, float)) else [float(x) for x in t]
    if len(vals) != n:
        raise ValueError(f"{name}: {len(vals)} times given for {n} model stages")
    if any(x < 0 for x in vals):
        raise ValueError(f"{name}: times must be non-negative, got {vals}")
    return vals


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per rank: max over the action list of (#forwards so far - #backwards so far)."""
    out = []
    for acts in schedule.actions:
        n = peak = 0
        for a in acts:
            n += 1 if a.kind == "F" else -1
            peak = max(peak, n)
        out.append(peak)
    return out


def simulate(schedule: Schedule, t_fwd: float | Sequence[float] = 1.0, t_bwd: float | Sequence[float] = 2.0,
             p2p_latency: float = 0.0) -> SimResult:
    """Time `schedule` with per-chunk forward/backward times (a number, or one per model stage
    0..p·v-1) and a p2p latency between ranks. Raises ScheduleError if it deadlocks."""
    S = schedule.num_model_stages
    tf, tb = _per_stage(t_fwd, S, "t_fwd"), _per_stage(t_bwd, S, "t_bwd")
    if p2p_latency < 0:
        raise ValueError(f"p2p_latency must be non-negative, got {p2p_latency}")
    end: dict[tuple[int, Action], float] = {}
    free = [0.0] * schedule.stages
    events: list[list[Event]] = [[] for _ in range(schedule.stages)]
    for r, i in execution_order(schedule):
        a = schedule.actions[r][i]
        stage = schedule.model_stage(r, a.chunk)
        ready = free[r]
        src = schedule.producer(r, a)
        if src is not None:
            ready = max(ready, end[src] + (p2p_latency if src[0] != r else 0.0))
        dur = tf[stage] if a.kind == "F" else tb[stage]
        end[(r, a)] = free[r] = ready + dur
        events[r].append(Event(r, a, stage, ready, ready + dur))
    busy = [sum(e.end - e.start for e in ev) for ev in events]
    return SimResult(schedule, events, max(free), busy, peak_in_flight(schedule))


def render_ascii(result: SimResult, unit: float | None = None) -> str:
    """A text timeline, one row per rank, one cell per `unit` of time (default: the shortest
    action). Cells show the action (F3 = forward of micro-batch 3, B3.1 = backward of
    micro-batch 3 in chunk 1) or '.' when the rank idles.

        rank 0 | F0 F1 F2 F3 .  .  .  B0 B0 B1 B1 ...
    """
    durations = [e.end - e.start for ev in result.events for e in ev if e.end > e.start]
    unit = unit or (min(durations) if durations else 1.0)
    cols = max(1, round(result.makespan / unit))
    width = max([len(str(e.action)) for ev in result.events for e in ev] + [1]) + 1
    lines = []
    for r, ev in enumerate(result.events):
        cells = ["." .ljust(width)] * cols
        for e in ev:
            for c in range(round(e.start / unit), round(e.end / unit)):
                cells[min(c, cols - 1)] = str(e.action).ljust(width)
        lines.append(f"rank {r} | " + "".join(cells).rstrip())
    s = result.schedule
    lines.append(f"{s.name}: p={s.stages} m={s.micro_batches} v={s.virtual}  makespan {result.makespan:g}"
                 f"  bubble {result.bubble_fraction:.3f}  peak in flight {result.peak_in_flight}")
    return "\n".join(lines)


def plot_timeline(result: SimResult, ax=None, path: str | None = None):
    """A Gantt chart of the timeline (forwards blue, backwards green, shaded by chunk) with
    matplotlib; saves to `path` when given. Returns the axes."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, result.makespan * 0.25), 0.5 * result.schedule.stages + 1.2))
    v = result.schedule.virtual
    for r, ev in enumerate(result.events):
        for e in ev:
            shade = 1.0 - 0.45 * e.action.chunk / max(v - 1, 1)
            base = (0.2, 0.45, 0.9) if e.action.kind == "F" else (0.2, 0.7, 0.3)
            color = tuple(c * shade for c in base)
            ax.broken_barh([(e.start, e.end - e.start)], (r - 0.4, 0.8), facecolors=color, edgecolors="white")
            ax.text((e.start + e.end) / 2, r, str(e.action.micro), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(result.schedule.stages), [f"rank {r}" for r in range(result.schedule.stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{result.schedule.name}: p={result.schedule.stages} m={result.schedule.micro_batches} "
                 f"bubble {result.bubble_fraction:.3f}")
    if path is not None:
        ax.figure.savefig(path, bbox_inches="tight", dpi=120)
    return ax
