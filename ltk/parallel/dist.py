"""Processes, groups and counted collectives: the ground every strategy in ltk/parallel/ stands on.

A training job of N processes ("ranks") is laid out on a mesh of pp x dp x cp x tp ranks, tensor
parallel innermost so that the chattiest axis stays inside a node (Megatron-LM's layout,
Narayanan et al. 2021 §3.2; context parallel next to it):

    rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index

Every collective in ltk/parallel/ goes through a `Comm` (one process group + a counter), so a
step can be audited: how many all-reduces, how many bytes. Two byte counts are kept:

    payload  the size of the logical tensor the collective is about — the whole buffer for
             all-reduce and broadcast, the full (unsharded) buffer for reduce-scatter and
             all-gather, the message for send. This is the Ψ of the ZeRO paper's accounting
             (Rajbhandari et al. 2020 §7: DDP moves 2Ψ, ZeRO-3 3Ψ, counted in these units
             as one all-reduce = reduce-scatter + all-gather of Ψ).
    wire     what one rank sends with the bandwidth-optimal ring algorithm:
                 all-reduce       2 (n-1)/n · B     (reduce-scatter, then all-gather)
                 reduce-scatter   (n-1)/n · B
                 all-gather       (n-1)/n · B
                 broadcast        B                 (pipelined chain: each rank forwards it once)
                 send             B

NCCL on CUDA, gloo on CPU; gloo runs every collective used here, so every test runs on a
CPU. `spawn` starts a group of local processes for tests and labs and fails fast — a rank
that raises, or a group that hangs past the timeout, takes the whole group down with an
error that names the rank.
"""
from __future__ import annotations

import itertools
import os
import pickle
import socket
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltk.parallel import timeline

RING_FACTOR = {  # wire bytes per rank = factor(n) * payload bytes (module docstring)
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
}


@dataclass
class CommStats:
    """Calls, payload bytes and ring wire bytes per collective, since the last `reset`."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wire: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, op: str, nbytes: int, group_size: int) -> None:
        self.calls[op] += 1
        self.payload[op] += nbytes
        self.wire[op] += RING_FACTOR[op](group_size) * nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()
        self.wire.clear()

    def snapshot(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "payload_bytes": dict(self.payload), "wire_bytes": dict(self.wire),
                "total_payload_bytes": sum(self.payload.values()), "total_wire_bytes": sum(self.wire.values())}


STATS = CommStats()  # the process-wide counter every Comm records into


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """One process group and its counted collectives. `group=None` is the world.

    Every method takes `async_op`; with it the collective is started and a handle returned
    (`.wait()` before reading the result) so communication can overlap computation.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, stats: CommStats | None = None):
        self.group = group
        self.stats = STATS if stats is None else stats
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        # the group's global ranks: how ltk/parallel/timeline.py matches one call across its ranks
        self.key = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(self.size))

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = False):
        if self.size == 1:
            return None
        self.stats.record("all_reduce", _nbytes(t), self.size)
        return timeline.record("all_reduce", self.key,
                               lambda: dist.all_reduce(t, op=op, group=self.group, async_op=async_op), async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = False):
        """out[i] = Σ_ranks inp[rank i's slice]; inp holds size * out.numel() elements."""
        if inp.numel() != out.numel() * self.size:
            raise ValueError(f"reduce_scatter: input has {inp.numel()} elements, expected {self.size} x {out.numel()}")
        if self.size == 1:
            out.copy_(inp.view_as(out))
            return None
        self.stats.record("reduce_scatter", _nbytes(inp), self.size)
        return timeline.record("reduce_scatter", self.key, lambda: dist.reduce_scatter_single(
            out, inp, op=op, group=self.group, async_op=async_op), async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        """out = concat over ranks of inp (rank order); out holds size * inp.numel() elements."""
        if out.numel() != inp.numel() * self.size:
            raise ValueError(f"all_gather: output has {out.numel()} elements, expected {self.size} x {inp.numel()}")
        if self.size == 1:
            out.view_as(inp).copy_(inp)
            return None
        self.stats.record("all_gather", _nbytes(out), self.size)
        return timeline.record("all_gather", self.key,
                               lambda: dist.all_gather_single(out, inp, group=self.group, async_op=async_op), async_op)

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False):
        """`src` is a rank of this group."""
        if self.size == 1:
            return None
        self.stats.record("broadcast", _nbytes(t), self.size)
        return timeline.record("broadcast", self.key, lambda: dist.broadcast(
            t, src=self.global_rank(src), group=self.group, async_op=async_op), async_op)

    def send(self, t: torch.Tensor, dst: int):
        self.stats.record("send", _nbytes(t), self.size)
        me, peer = self.global_rank(self.rank), self.global_rank(dst)
        return timeline.record("send", self.key, lambda: dist.isend(t.contiguous(), dst=peer, group=self.group),
                               True, src=me, dst=peer)

    def recv(self, t: torch.Tensor, src: int):
        self.stats.record("recv", _nbytes(t), self.size)
        me, peer = self.global_rank(self.rank), self.global_rank(src)
        return timeline.record("recv", self.key, lambda: dist.irecv(t, src=peer, group=self.group),
                               True, src=peer, dst=me)

    def barrier(self) -> None:
        if self.size > 1:
            timeline.record("barrier", self.key, lambda: dist.barrier(group=self.group), False)


# -- the mesh ---------------------------------------------------------------------------
@dataclass
class Mesh:
    """pp x dp x cp x tp ranks; `comm(axis)` is this rank's group along one axis, or along
    "dp_cp": the dp and cp axes flattened (the ranks that hold the same parameters when the
    sequence is split over cp: gradients are reduced and states sharded over them, as
    torchtitan's dp_shard_cp). Context parallel sits between dp and tp: its ring traffic is
    the second chattiest after tp's.

        rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index

    Every rank must build the mesh (dist.new_group is collective: all ranks create every
    group, in the same order, even groups they are not in).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    comms: dict[str, Comm] = field(default_factory=dict)
    coords: dict[str, int] = field(default_factory=dict)

    AXES = ("pp", "dp", "cp", "tp")  # outermost first

    @classmethod
    def build(cls, dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1) -> "Mesh":
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dp * cp * tp * pp != world:
            raise ValueError(f"mesh dp={dp} x cp={cp} x tp={tp} x pp={pp} = {dp * cp * tp * pp} ranks, but the "
                             f"world has {world}")
        mesh = cls(dp=dp, tp=tp, pp=pp, cp=cp)
        mesh.coords = {"pp": rank // (dp * cp * tp), "dp": rank // (cp * tp) % dp, "cp": rank // tp % cp,
                       "tp": rank % tp}
        for axis in ("tp", "dp", "pp") + (("cp", "dp_cp") if cp > 1 else ()):
            for ranks in mesh.groups_along(axis):
                group = dist.new_group(ranks) if world > 1 else None
                if rank in ranks:
                    mesh.comms[axis] = Comm(group)
        if cp == 1:  # whole sequences: dp x cp is dp (and there is no cp group)
            mesh.comms["dp_cp"] = mesh.comms["dp"]
        return mesh

    def rank_of(self, pp: int, dp: int, tp: int, cp: int = 0) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def groups_along(self, axis: str) -> list[list[int]]:
        """Every group of ranks that differ only in `axis` ("dp_cp": in dp and cp, dp major), in
        a fixed order."""
        sizes = {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}
        varying = ("dp", "cp") if axis == "dp_cp" else (axis,)
        others = [a for a in self.AXES if a not in varying]
        out = []
        for fixed in itertools.product(*(range(sizes[a]) for a in others)):
            c = dict(zip(others, fixed))
            out.append([self.rank_of(**c, **dict(zip(varying, v)))
                        for v in itertools.product(*(range(sizes[a]) for a in varying))])
        return out

    def comm(self, axis: str) -> Comm:
        return self.comms[axis]


# -- starting processes -----------------------------------------------------------------
def init_from_env(timeout_s: float = 600) -> tuple[int, int]:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT): NCCL on CUDA,
    gloo on CPU. Returns (rank, world_size); a single process needs no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_fake(rank: int, world_size: int) -> None:
    """A process group with no peers: collectives return at once without moving data, so one
    process can build rank `rank` of a world of thousands and measure its memory."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, timeout_s: float,
            backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend != "nccl":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)  # N ranks share the cores; one thread each avoids oversubscription
    try:
        if backend == "fake":
            init_fake(rank, world)
        elif backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                    device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        # plain pickle copies tensors by value; the queue's own pickler would pass shared memory
        # that vanishes when this process exits
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report, then die: the parent tears the group down
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class SpawnError(RuntimeError):
    pass


def spawn(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120, fake_rank: int | None = None,
          device: str = "cpu") -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` fresh CPU processes on gloo and return
    the results in rank order. `fn` must be importable (module level). The first rank to
    raise, or the timeout, kills every process and raises SpawnError naming the rank.

    fake_rank: start only that rank, in a fake process group of world_size ranks (init_fake:
    collectives return at once), to measure one rank of a world too big to run.
    device="cuda": one process per GPU (rank r on cuda:r) on NCCL."""
    import queue as queue_mod
    import time

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    ranks = list(range(world_size)) if fake_rank is None else [fake_rank]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"spawn: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"spawn: {world_size} ranks on CUDA need {world_size} GPUs, "
                         f"{torch.cuda.device_count()} visible")
    backend = "fake" if fake_rank is not None else ("nccl" if device == "cuda" else "gloo")
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, q, timeout_s, backend), daemon=True)
             for r in ranks]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < len(ranks):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(ranks) - set(results))
                raise SpawnError(f"timed out after {timeout_s:.0f} s waiting for ranks {missing} (a hang?)")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in zip(ranks, procs)
                        if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise SpawnError(f"rank {dead[0][0]} died with exit code {dead[0][1]}") from None
                continue
            if status == "error":
                raise SpawnError(f"rank {rank} raised:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in ranks]
