"""Per-rank timelines: where each rank's time went in every step of a multi-process run —
computing, communicating where nothing hid it (exposed), or idle, waiting for a slower peer.

    with Timeline(device) as tl:            # every Comm collective of ltk/parallel/ is now timed
        for step in range(n):
            tl.begin_step(step); train_step(); tl.end_step()
        rows = tl.flush()                   # collective: rank 0 gets every rank's steps

What is measured. A rank is *blocked* while its host sits in a collective call (async_op=False)
or in `work.wait()` of an asynchronous one; every other moment of its step it is computing
(or launching compute). A blocked interval [s, e] is split at the moment the transfer could
begin, `ready` = the last post of the collective among the ranks that take part (for a
send/recv pair, the later of the two posts):

    idle_i = clamp(ready_i − s_i, 0, e_i − s_i)     waiting for a peer that had not arrived
    comm_i = (e_i − s_i) − idle_i                    moving bytes, exposed
    compute = (end − start) − Σ_i (e_i − s_i)        so compute + comm + idle = the step

Posts are compared across processes, which needs one clock: on one host CLOCK_MONOTONIC is
shared by every process (time.monotonic), so the split is exact up to the call overheads;
across hosts the clocks are aligned at start after a barrier (error: the barrier's skew,
tens of microseconds on a LAN). A collective started with async_op=True and waited for
later overlaps the compute in between: only the part of its wait that remains is exposed,
which is the quantity the simulator predicts (ltk/parallel/simulator.py `comm_exposed`). One
posted in a step and waited for in a later one (ZeRO-1/2's parameter all-gathers, launched at
step() and waited for by the next forward) counts in the step that waits.

On CUDA the host returns from NCCL calls at once and the *stream* waits, so host timers
would see nothing: there the blocked intervals are CUDA events recorded on the compute stream
around each call and wait (the stall between them is what the stream lost). Device clocks of
different GPUs are not comparable, so on CUDA waiting for a peer cannot be told apart from
transfer: idle is 0 and `comm` includes it (the report says so).

Collectives that do not go through parallel.dist.Comm (PyTorch's DDP reducer, FSDP2) are not
seen; their time counts as compute. The timeline only records inside begin_step/end_step.
"""
from __future__ import annotations

import json
import socket
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

ACTIVE: "Timeline | None" = None  # the recorder Comm reports to (ltk/parallel/dist.py)
P2P = ("send", "recv")


def record(op: str, key: tuple, fn: Callable, async_op: bool, src: int | None = None, dst: int | None = None):
    """Run one communication call `fn` of group `key` (its global ranks) under the active
    timeline, if any. src/dst: global ranks of a point-to-point message."""
    return fn() if ACTIVE is None else ACTIVE.call(op, key, fn, async_op, src, dst)


class _TimedWork:
    """An async collective's handle whose wait() is timed; everything else passes through."""

    def __init__(self, work, tl: "Timeline", ev: dict):
        self._work, self._tl, self._ev, self._step = work, tl, ev, tl._cur

    def wait(self, *args, **kwargs):
        a = self._tl._mark()
        out = self._work.wait(*args, **kwargs)
        if "start" not in self._ev:  # a second wait returns at once: the first is the one that blocked
            ev, cur = self._ev, self._tl._cur
            if cur is not None and cur is not self._step:  # posted in an earlier step, waited in this one
                ev = {k: v for k, v in ev.items() if k in ("op", "match", "seq", "post")}
                cur["events"].append(ev)
                self._ev["start"] = None  # the posting step keeps no wait of it
            if cur is not None:
                ev["start"], ev["end"] = a, self._tl._mark()
        return out

    def __getattr__(self, name: str):
        return getattr(self._work, name)


class Timeline:
    """enabled=False: every method does nothing (a single-process run has no timeline), so a
    training loop calls it unconditionally."""

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True):
        self.enabled = enabled
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.clock = "cuda-events" if self.cuda else "host-monotonic"
        self.offset = 0.0  # this rank's clock minus rank 0's
        self.steps: list[dict] = []  # this rank's raw steps since the last flush
        self.rows: list[dict] = []  # rank 0: analysed (step, rank) rows of every flush
        self.last_window: list[list[dict]] = []  # rank 0: raw steps of every rank, last flush
        self._cur: dict | None = None
        self._seq: dict[tuple, int] = defaultdict(int)

    # -- activation ------------------------------------------------------------------------
    def __enter__(self) -> "Timeline":
        global ACTIVE
        if not self.enabled:
            return self
        if ACTIVE is not None:
            raise RuntimeError("a Timeline is already recording in this process")
        self._align()
        ACTIVE = self
        return self

    def __exit__(self, *exc) -> bool:
        global ACTIVE
        if ACTIVE is self:
            ACTIVE = None
        return False

    def _align(self) -> None:
        """Across hosts, shift every rank's clock onto rank 0's (after a barrier every rank
        is at the same instant, up to the barrier's skew); on one host the clock is shared."""
        if self.world == 1 or self.cuda:
            return
        here = [None] * self.world
        dist.all_gather_object(here, socket.gethostname())
        if len(set(here)) == 1:
            return
        dist.barrier()
        t = [None] * self.world
        dist.all_gather_object(t, time.monotonic())
        self.offset = t[self.rank] - t[0]

    # -- recording ---------------------------------------------------------------------------
    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.monotonic() - self.offset

    def begin_step(self, step: int) -> None:
        if not self.enabled:
            return
        self._cur = {"step": step, "start": self._mark(), "events": []}

    def end_step(self) -> None:
        if not self.enabled:
            return
        if self._cur is None:
            raise RuntimeError("end_step without begin_step")
        self._cur["end"] = self._mark()
        self.steps.append(self._cur)
        self._cur = None

    def call(self, op: str, key: tuple, fn: Callable, async_op: bool, src: int | None, dst: int | None):
        if self._cur is None:  # set-up, evaluation, checkpoints: outside the steps, not recorded
            return fn()
        # the n-th collective on a group (the n-th message src -> dst) is the same call on every rank
        match = (key, src, dst) if op in P2P else (key,)
        ev = {"op": op, "match": match, "seq": self._seq[match]}
        self._seq[match] += 1
        start = self._mark()  # a host time, or a CUDA event on the compute stream
        ev["post"] = None if self.cuda else start  # posts are only comparable on a shared clock
        self._cur["events"].append(ev)
        work = fn()
        if async_op or op in P2P:
            return _TimedWork(work, self, ev)
        ev["start"], ev["end"] = start, self._mark()  # NCCL: the stream waits for the collective
        return work

    # -- gathering and analysis ----------------------------------------------------------------
    def _resolved(self) -> list[dict]:
        """This rank's steps with plain float seconds (CUDA events: relative to the step start)."""
        if not self.cuda:
            return self.steps
        torch.cuda.synchronize(self.device)
        out = []
        for s in self.steps:
            t0 = s["start"]
            sec = lambda ev: t0.elapsed_time(ev) / 1e3  # noqa: E731
            events = [{**e, "post": None,
                       **({"start": sec(e["start"]), "end": sec(e["end"])} if e.get("start") is not None else {})}
                      for e in s["events"]]
            out.append({"step": s["step"], "start": 0.0, "end": sec(s["end"]), "events": events})
        return out

    def flush(self) -> list[dict] | None:
        """Collective (every rank calls it at the same point): gather the steps recorded since
        the last flush to rank 0 and analyse them. Returns rank 0's new rows, None elsewhere."""
        if not self.enabled:
            return None
        mine = self._resolved()
        self.steps = []
        if self.world == 1:
            gathered = [mine]
        else:
            gathered = [None] * self.world if self.rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        rows = analyse(gathered, shared_clock=not self.cuda)
        self.rows += rows
        if any(gathered):  # an empty flush (no step since the last) keeps the window to plot
            self.last_window = gathered
        return rows

    def summary(self) -> dict[str, Any]:
        """Rank 0: {"timeline": per-rank medians} for a run's summary.json; {} elsewhere."""
        return {"timeline": {"clock": self.clock, "per_rank": per_rank_means(self.rows)}} if self.rows else {}

    def write(self, folder: str | Path, plot: bool = True) -> Path | None:
        """Rank 0: timeline.json (every analysed row and the per-rank means) and timeline.png."""
        if not self.enabled or self.rank != 0 or not self.rows:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"clock": self.clock, "world": self.world,
               "note": ("idle is waiting for a slower peer; comm is exposed transfer" if not self.cuda else
                        "CUDA events: waiting for a peer is counted in comm (no shared clock across GPUs)"),
               "per_rank": per_rank_means(self.rows), "steps": self.rows}
        path = folder / "timeline.json"
        path.write_text(json.dumps(doc, indent=1))
        if plot:
            from ltk.parallel.timeline_plot import plot_timeline

            plot_timeline(self.last_window, self.rows, folder / "timeline.png", shared_clock=not self.cuda)
        return path


def _ready_times(per_rank: list[list[dict]]) -> dict[tuple, float]:
    """(match, seq) -> the moment the transfer could start: the last post among its ranks."""
    posts: dict[tuple, float] = {}
    for steps in per_rank:
        for s in steps:
            for e in s["events"]:
                if e.get("post") is not None:
                    k = (tuple(map(_hashable, e["match"])), e["seq"])
                    posts[k] = max(posts.get(k, float("-inf")), e["post"])
    return posts


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def split_step(step: dict, ready: dict[tuple, float] | None) -> dict[str, Any]:
    """compute / comm / idle seconds of one rank's step (module docstring), comm by op, and the
    blocked intervals as (start, end, kind, op) for plotting. ready=None: no shared clock."""
    lo, hi = step["start"], step["end"]
    blocked = sorted((max(e["start"], lo), min(e["end"], hi), e) for e in step["events"] if e.get("start") is not None)
    comm, idle, by_op, segments, last = 0.0, 0.0, defaultdict(float), [], lo
    for s, e, ev in blocked:
        s = max(s, last)  # overlapping waits (never expected) count once
        if e <= s:
            continue
        last = e
        r = None if ready is None else ready.get((tuple(map(_hashable, ev["match"])), ev["seq"]))
        wait = 0.0 if r is None else min(max(r - s, 0.0), e - s)
        idle += wait
        comm += (e - s) - wait
        by_op[ev["op"]] += (e - s) - wait
        if wait > 0:
            segments.append((s, s + wait, "idle", ev["op"]))
        if e - s - wait > 0:
            segments.append((s + wait, e, "comm", ev["op"]))
    wall = hi - lo
    return {"wall": wall, "compute": max(wall - comm - idle, 0.0), "comm": comm, "idle": idle,
            "comm_by_op": dict(by_op), "segments": segments}


def analyse(per_rank: list[list[dict]], shared_clock: bool = True) -> list[dict]:
    """One row per (step, rank): wall, compute, comm, idle seconds and comm by op."""
    ready = _ready_times(per_rank) if shared_clock else None
    rows = []
    for rank, steps in enumerate(per_rank):
        for s in steps:
            split = split_step(s, ready)
            split.pop("segments")
            rows.append({"step": s["step"], "rank": rank, "start": s["start"], "end": s["end"], **split})
    return sorted(rows, key=lambda r: (r["step"], r["rank"]))


def step_times(rows: list[dict]) -> dict[int, float]:
    """step -> seconds from the first rank's start to the last rank's end (a shared clock)."""
    by: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["step"]].append(r)
    return {s: max(r["end"] for r in rs) - min(r["start"] for r in rs) for s, rs in sorted(by.items())}


def per_rank_means(rows: list[dict]) -> list[dict]:
    """Median over steps of each rank's wall, compute, comm and idle seconds."""
    by: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["rank"]].append(r)
    return [{"rank": k, **{q: statistics.median(r[q] for r in rs) for q in ("wall", "compute", "comm", "idle")}}
            for k, rs in sorted(by.items())]
