"""Pipeline schedules as data: for p ranks, m micro-batches and v model chunks per rank, the
ordered list of compute actions each rank performs in one optimizer step.

The model is cut into S = p·v stages. Rank r holds the v chunks c = 0..v-1, chunk c being
model stage s = c·p + r (Megatron's round-robin assignment, Narayanan et al. 2021 §2.2.2):

    p = 2, v = 2:   rank 0: stages 0, 2      rank 1: stages 1, 3
                    data path 0 -> 1 -> 0 -> 1 (the activation wraps from the last rank to rank 0)

A schedule lists only computations, `Action("F"|"B", micro, chunk)`; the communication is implied
and is exactly what the executor (ltk/parallel/pipeline.py) does:

    F(i, c) at stage s > 0      first receives the activation that F(i) at stage s-1 sent
    F(i, c) at stage s < S-1    then sends its output to stage s+1
    B(i, c) at stage s < S-1    first receives dLoss/d(output) that B(i) at stage s+1 sent
    B(i, c) at stage s > 0      then sends dLoss/d(input) to stage s-1

Receives block; sends are posted asynchronously and awaited at the end of the step, so a rank
only ever waits for data, never for a peer to reach a matching receive. Messages between two
ranks travel on FIFO channels, one per (source rank, destination rank, direction), matched in
order (no tags): a schedule is runnable when every channel is received in the order it is sent
and the "wait for my input" relation has no cycle. `validate` checks both, plus completeness,
by simulating the execution; the simulator (ltk/parallel/pipeline_sim.py) times the same execution.

Schedules (bubble = idle / ideal compute time, equal stage times; ltk/parallel/cost.py):

    gpipe(p, m)               all m forwards, then all m backwards        (Huang et al. 2019)
                              bubble (p-1)/m, m activations in flight
    one_f_one_b(p, m)         p-r-1 warm-up forwards, then one forward     (PipeDream-Flush,
                              one backward, then the remaining backwards   Narayanan et al. 2021
                              bubble (p-1)/m, at most p in flight          §2.2.1)
    interleaved_1f1b(p,m,v)   1F1B over v chunks per rank, micro-batches   (§2.2.2)
                              in groups of p; bubble (p-1)/(v·m)
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("F", "B")


class ScheduleError(ValueError):
    """A schedule that is incomplete, misordered or deadlocks."""


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward or "B" backward
    micro: int  # micro-batch index, 0..m-1
    chunk: int = 0  # the rank's local model chunk, 0..v-1 (model stage chunk·p + rank)

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int  # p: pipeline ranks
    micro_batches: int  # m
    virtual: int  # v: model chunks per rank
    actions: tuple[tuple[Action, ...], ...]  # actions[rank], in execution order

    @property
    def num_model_stages(self) -> int:
        return self.stages * self.virtual

    def model_stage(self, rank: int, chunk: int) -> int:
        return chunk * self.stages + rank

    def rank_chunk(self, stage: int) -> tuple[int, int]:
        return stage % self.stages, stage // self.stages

    def producer(self, rank: int, a: Action) -> tuple[int, Action] | None:
        """The (rank, action) whose message `a` receives, or None (first forward, last backward)."""
        s = self.model_stage(rank, a.chunk)
        if a.kind == "F" and s > 0:
            r, c = self.rank_chunk(s - 1)
            return r, Action("F", a.micro, c)
        if a.kind == "B" and s < self.num_model_stages - 1:
            r, c = self.rank_chunk(s + 1)
            return r, Action("B", a.micro, c)
        return None

    def consumer(self, rank: int, a: Action) -> tuple[int, Action] | None:
        """The (rank, action) that receives what `a` sends, or None (last forward, first backward)."""
        s = self.model_stage(rank, a.chunk) + (1 if a.kind == "F" else -1)
        if not 0 <= s < self.num_model_stages:
            return None
        r, c = self.rank_chunk(s)
        return r, Action(a.kind, a.micro, c)

    def render(self) -> str:
        """One line per rank: the action order (no timing; see pipeline_sim.render_ascii)."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


def _check_sizes(p: int, m: int, v: int = 1) -> None:
    for name, val in (("stages", p), ("micro_batches", m), ("virtual", v)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al. 2019): every rank runs all forwards, then all backwards."""
    _check_sizes(p, m)
    acts = [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]
    return Schedule("gpipe", p, m, 1, tuple(tuple(acts) for _ in range(p)))


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B / PipeDream-Flush (Narayanan et al. 2021 §2.2.1, figure 4 top): rank r runs
    w_r = min(p-r-1, m) warm-up forwards, then alternates F(w_r + k), B(k), then drains the
    last w_r backwards. At most w_r + 1 <= p activations are stored at any time."""
    _check_sizes(p, m)
    ranks = []
    for r in range(p):
        w = min(p - r - 1, m)
        acts = [Action("F", i) for i in range(w)]
        for k in range(m - w):
            acts += [Action("F", w + k), Action("B", k)]
        acts += [Action("B", i) for i in range(m - w, m)]
        ranks.append(tuple(acts))
    return Schedule("1f1b", p, m, 1, tuple(ranks))


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021 §2.2.2, figure 4 bottom; Megatron-LM's
    forward_backward_pipelining_with_interleaving). Each rank runs v·m forwards and backwards.
    The k-th forward of every rank is chunk (k mod p·v) // p of micro-batch
    (k // p·v)·p + k mod p: micro-batches go through a chunk in groups of p before the group
    moves to the next chunk; the k-th backward takes the chunks in reverse, v-1 - (k mod p·v)//p.
    Rank r warms up with w_r = min(2(p-r-1) + (v-1)·p, v·m) forwards, then alternates.
    The bubble shrinks v-fold, (p-1)/(v·m), for v-fold more p2p messages. m must be a
    multiple of p (the groups of p), as in Megatron. v = 1 is plain 1F1B."""
    _check_sizes(p, m, v)
    if v == 1:
        return one_f_one_b(p, m)
    if m % p:
        raise ValueError(f"interleaved 1F1B needs micro_batches to be a multiple of stages: m={m}, p={p}")
    total, group = v * m, p * v

    def fwd(k: int) -> Action:
        return Action("F", (k // group) * p + k % p, (k % group) // p)

    def bwd(k: int) -> Action:
        return Action("B", (k // group) * p + k % p, v - 1 - (k % group) // p)

    ranks = []
    for r in range(p):
        w = min(2 * (p - r - 1) + (v - 1) * p, total)
        acts = [fwd(k) for k in range(w)]
        for k in range(total - w):
            acts += [fwd(w + k), bwd(k)]
        acts += [bwd(k) for k in range(total - w, total)]
        ranks.append(tuple(acts))
    return Schedule(f"interleaved-1f1b(v={v})", p, m, v, tuple(ranks))


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b}


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {sorted(SCHEDULES)}")
    if name == "interleaved":
        return interleaved_1f1b(p, m, v)
    if v != 1:
        raise ValueError(f"schedule {name!r} has one chunk per rank; got virtual={v} (use 'interleaved')")
    return SCHEDULES[name](p, m)


# -- validation --------------------------------------------------------------------------
def _check_complete(s: Schedule) -> None:
    if len(s.actions) != s.stages:
        raise ScheduleError(f"{s.name}: {len(s.actions)} rank lists for {s.stages} stages")
    want = {Action(k, i, c) for k in KINDS for i in range(s.micro_batches) for c in range(s.virtual)}
    for r, acts in enumerate(s.actions):
        seen: set[Action] = set()
        for a in acts:
            if a not in want:
                raise ScheduleError(f"{s.name}: rank {r} has an invalid action {a!r}")
            if a in seen:
                raise ScheduleError(f"{s.name}: rank {r} runs {a} twice")
            if a.kind == "B" and Action("F", a.micro, a.chunk) not in seen:
                raise ScheduleError(f"{s.name}: rank {r} runs {a} before its forward")
            seen.add(a)
        if seen != want:
            missing = sorted(map(str, want - seen))
            raise ScheduleError(f"{s.name}: rank {r} never runs {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def _check_channels(s: Schedule) -> None:
    """Every cross-rank FIFO channel must be received in the order it is sent."""
    sent: dict[tuple, list[Action]] = {}
    recvd: dict[tuple, list[Action]] = {}
    for r, acts in enumerate(s.actions):
        for a in acts:
            dst, src = s.consumer(r, a), s.producer(r, a)
            if dst is not None and dst[0] != r:
                sent.setdefault((r, dst[0], a.kind), []).append(a)
            if src is not None and src[0] != r:
                recvd.setdefault((src[0], r, a.kind), []).append(src[1])
    for ch in sent.keys() | recvd.keys():
        a, b = sent.get(ch, []), recvd.get(ch, [])
        if a != b:
            first = next((str(x), str(y)) for x, y in zip(a + [None] * len(b), b + [None] * len(a)) if x != y)
            raise ScheduleError(f"{s.name}: channel {ch[0]}->{ch[1]} ({'activations' if ch[2] == 'F' else 'gradients'})"
                                f" is received out of order: first (sent, expected) mismatch {first}")


def execution_order(s: Schedule) -> list[tuple[int, int]]:
    """A topological order of every (rank, index) under the execution model above: each rank
    runs its list in order, an action waiting only for its producer's message. Raises
    ScheduleError naming every rank's blocked action when the schedule deadlocks."""
    index = {(r, a): i for r, acts in enumerate(s.actions) for i, a in enumerate(acts)}
    pos = [0] * s.stages
    order: list[tuple[int, int]] = []
    total = sum(len(a) for a in s.actions)
    while len(order) < total:
        progressed = False
        for r in range(s.stages):
            while pos[r] < len(s.actions[r]):
                src = s.producer(r, s.actions[r][pos[r]])
                if src is not None and pos[src[0]] <= index[src]:
                    break  # its input is not produced yet
                order.append((r, pos[r]))
                pos[r] += 1
                progressed = True
        if not progressed:
            blocked = [f"rank {r} at {s.actions[r][pos[r]]} waits for rank {s.producer(r, s.actions[r][pos[r]])[0]}"
                       for r in range(s.stages) if pos[r] < len(s.actions[r])]
            raise ScheduleError(f"{s.name}: deadlock: " + "; ".join(blocked))
    return order


def validate(s: Schedule) -> Schedule:
    """Complete (each rank runs F and B of every micro-batch on each of its chunks exactly once,
    B after F), FIFO-consistent and deadlock-free; returns the schedule or raises ScheduleError."""
    _check_complete(s)
    _check_channels(s)
    execution_order(s)
    return s
