"""Calibration: the measured numbers that replace a cluster's datasheet ones in the simulator —
the FLOP/s a device reaches on the training step, and (α, β) per collective kind — and how to
measure them on this machine with a few gloo (or NCCL) processes.

Two rates are measured while every rank works at once, because they degrade differently when
ranks share hardware: the matmul rate (compute-bound, each core its own) and the streaming
bandwidth of an elementwise add (memory-bound: the ranks of one host share its memory
channels). On the 2-core CPU here two processes keep ~100% of the matmul rate but ~75% of the
bandwidth each; a training step that is partly memory-bound slows in between."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from ltk.parallel.cluster import Cluster
from ltk.parallel.collectives import fit_alpha_beta


@dataclass(frozen=True)
class Calibration:
    """Measured numbers that replace the cluster's datasheet ones: the FLOP/s a device reaches
    on the training step (or that rate as a fraction of peak), and (α, β) per collective kind
    measured within one node."""

    achieved_flops: float | None = None
    efficiency: float | None = None
    collectives: dict[str, tuple[float, float]] = field(default_factory=dict)
    bandwidth: float | None = None  # bytes/s a rank streams (elementwise add) while all do

    @classmethod
    def from_measurements(cls, flops_per_token: float | None = None, seconds_per_token: float | None = None,
                          collective_points: dict[str, list] | None = None) -> "Calibration":
        """From one device's measured time per token of a model of `flops_per_token`, and
        (bytes, seconds[, group_size]) points per collective kind (fitted by fit_alpha_beta;
        a negative fitted α, noise on a tiny latency, is clamped to 0)."""
        achieved = None
        if seconds_per_token is not None:
            if not flops_per_token or seconds_per_token <= 0:
                raise ValueError("seconds_per_token needs the model's flops_per_token and must be > 0")
            achieved = flops_per_token / seconds_per_token
        fits = {}
        for kind, pts in (collective_points or {}).items():
            a, b = fit_alpha_beta(pts, kind)
            fits[kind] = (max(a, 0.0), b)
        return cls(achieved_flops=achieved, collectives=fits)

    def efficiency_for(self, cluster: Cluster) -> float | None:
        if self.efficiency is not None:
            return self.efficiency
        return None if self.achieved_flops is None else self.achieved_flops / cluster.peak_flops


def _measure_worker(rank: int, world: int, sizes: Sequence[int], repeats: int, matmul_n: int,
                    statistic: str = "min", device: str = "cpu", matmul_s: float = 0.3) -> dict:
    import statistics
    import time

    import torch

    from ltk.parallel.dist import Comm

    comm, out = Comm(), {}
    pick = min if statistic == "min" else statistics.median
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    for kind in ("all_reduce", "reduce_scatter", "all_gather") if world > 1 else ():
        pts = []
        for n in sizes:
            numel = max(world, n // 4 // world * world)  # fp32, a multiple of the group
            full, shard = torch.ones(numel, device=dev), torch.ones(numel // world, device=dev)
            times = []
            for _ in range(repeats + 2):  # the first calls set up connections and buffers: discarded
                comm.barrier()
                t0 = time.perf_counter()
                if kind == "all_reduce":
                    comm.all_reduce(full)
                elif kind == "reduce_scatter":
                    comm.reduce_scatter(shard, full)
                else:
                    comm.all_gather(full, shard)
                sync()
                times.append(time.perf_counter() - t0)
            pts.append((numel * 4, pick(times[2:]), world))
        out[kind] = pts
    # the matmul rate and the streaming bandwidth while every rank works at once, over the same
    # wall-clock windows, so ranks that share a core or memory get their share of it; the best
    # of 3 windows each (noise only slows)
    a, b = torch.randn(matmul_n, matmul_n, device=dev), torch.randn(matmul_n, matmul_n, device=dev)
    x, y = torch.randn(2**22, device=dev), torch.randn(2**22, device=dev)  # 16 MiB each: beyond the caches
    z = torch.empty_like(x)
    work = {"flops": (lambda: a @ b, 2 * matmul_n**3), "bandwidth": (lambda: torch.add(x, y, out=z), 3 * x.nbytes)}
    for key, (op, per_call) in work.items():
        for _ in range(8):  # warm-up: thread pools, allocator, clocks
            op()
        rates = []
        for _ in range(3):
            comm.barrier()
            t0, reps = time.perf_counter(), 0
            while time.perf_counter() - t0 < matmul_s:
                op()
                reps += 1
                if reps % 16 == 0:
                    sync()
            sync()
            rates.append(per_call * reps / (time.perf_counter() - t0))
        out[key] = max(rates)
    return out


def measure_calibration(world: int = 2, sizes: Sequence[int] = (2**12, 2**20, 2**24), repeats: int = 5,
                        matmul_n: int = 256, timeout_s: float = 120, statistic: str = "min",
                        device: str = "cpu") -> Calibration:
    """Measure this machine with `world` gloo processes (parallel.dist.spawn): each collective
    at each size `repeats` times, fitted per kind by fit_alpha_beta, and the matmul rate and
    streaming bandwidth a process keeps while all `world` work together (means over ranks). statistic="min"
    takes the fastest call (noise only adds time: the link's capability); "median" the typical
    call, what a training step meets on a shared machine. world=1 measures the rate alone.
    device="cuda": one GPU per rank on NCCL. A quick, small measurement (a few seconds)."""
    from ltk.parallel.dist import spawn

    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    res = spawn(_measure_worker, world, tuple(sizes), repeats, matmul_n, statistic, device, timeout_s=timeout_s,
                device=device)
    flops = sum(r.pop("flops") for r in res) / world
    bandwidth = sum(r.pop("bandwidth") for r in res) / world
    cal = Calibration.from_measurements(collective_points=res[0])
    return Calibration(achieved_flops=flops, collectives=cal.collectives, bandwidth=bandwidth)


def calibrated_cluster(calibration: Calibration, processes: int = 2) -> Cluster:
    """The cpu-gloo preset with the measured matmul rate as its peak and the measured
    all-reduce link as both its links (one host: there is no second kind of link)."""
    from ltk.parallel.cluster import cpu_gloo

    c = cpu_gloo(processes)
    if calibration.achieved_flops:
        c = replace(c, peak_flops=calibration.achieved_flops)
    if "all_reduce" in calibration.collectives:
        a, b = calibration.collectives["all_reduce"]
        c = replace(c, intra_node_latency=a, intra_node_bandwidth=b, inter_node_latency=a, inter_node_bandwidth=b)
    return c
