"""The alpha-beta model of collectives: seconds for an all-reduce, reduce-scatter, all-gather,
broadcast or send of n bytes on p ranks over a cluster's links (ring and double binary tree,
hierarchical across nodes), and the least-squares fit of (α, β) from measured points. The
simulator (ltk/parallel/simulator.py) prices every collective of a step with these."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from ltk.parallel.cluster import Cluster

if TYPE_CHECKING:
    from ltk.parallel.calibration import Calibration

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send")


def _terms(kind: str, p: int, nodes: int, algorithm: str) -> tuple[float, float, float]:
    """(intra-node latency hops, inter-node latency hops, bandwidth factor) of one collective
    on p ranks spread over `nodes` nodes: t = A_i·α_i + A_e·α_e + B·n/β."""
    g, q = math.ceil(p / nodes), nodes
    if algorithm == "ring":
        steps, inter = {"all_reduce": (2 * (p - 1), 2 * (q - 1)), "send": (1, q - 1)}.get(kind, (p - 1, q - 1))
        factor = {"all_reduce": 2 * (p - 1) / p, "broadcast": 1.0, "send": 1.0}.get(kind, (p - 1) / p)
        return steps - inter, inter, factor
    if algorithm == "tree" and kind in ("all_reduce", "broadcast"):
        up_down = 2 if kind == "all_reduce" else 1
        return up_down * math.ceil(math.log2(g)), up_down * math.ceil(math.log2(q)), float(up_down)
    raise ValueError(f"algorithm {algorithm!r} does not run {kind!r}: tree covers all_reduce and broadcast, "
                     f"ring every kind ({', '.join(KINDS)})")


def collective_time(kind: str, nbytes: float, group_size: int, cluster: Cluster, span: int = 1,
                    algorithm: str = "ring", calibration: "Calibration | None" = None) -> float:
    """Seconds for one collective of `nbytes` payload (ltk/parallel/dist.py: the whole buffer for
    all-reduce / broadcast, the unsharded buffer for reduce-scatter / all-gather, the message
    for send) on `group_size` ranks spread over `span` nodes.

    One link (Hockney; Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective
    Communication Operations in MPICH", §4), p ranks, n bytes, latency α, bandwidth β:

        ring all-reduce       2(p-1)·α + 2(p-1)/p · n/β      reduce-scatter, then all-gather
        ring reduce-scatter   (p-1)·α  + (p-1)/p · n/β       (bandwidth-optimal: Patarasuk &
        ring all-gather       (p-1)·α  + (p-1)/p · n/β        Yuan 2009)
        ring broadcast        (p-1)·α  + n/β                 pipelined chain
        send / recv           α + n/β
        tree all-reduce       2·⌈log2 p⌉·α + 2·n/β           double binary tree (Sanders, Speck &
        tree broadcast        ⌈log2 p⌉·α + n/β                Träff 2009; NCCL >= 2.4): pipelined
                              reduce up, broadcast down; each tree carries half the message,
                              so each rank's link moves n in each phase.

    Across nodes (span q > 1, g = p/q ranks per node) the group runs as NCCL runs it (NVIDIA
    nccl, src/graph/tuning.cc): g rings or trees in parallel, one per NIC, so the bandwidth is
    β = min(β_intra, g·β_inter); of a ring's steps, the 2(q-1) (all-reduce) or q-1 that cross
    a node boundary pay α_inter, the rest α_intra; a tree climbs ⌈log2 g⌉ levels inside the
    node and ⌈log2 q⌉ across nodes. A `calibration` with measured (α, β) for `kind` replaces
    the intra-node link (it was measured within one node)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
    if group_size < 1 or not 1 <= span <= group_size:
        raise ValueError(f"a group of {group_size} ranks cannot span {span} nodes")
    if kind == "send" and group_size != 2:
        raise ValueError(f"send/recv is between 2 ranks, got a group of {group_size}")
    if math.ceil(group_size / span) > cluster.devices_per_node:
        raise ValueError(f"{group_size} ranks on {span} node(s), but a {cluster.name} node has "
                         f"{cluster.devices_per_node} devices")
    if group_size == 1 or nbytes <= 0:
        return 0.0
    a_i, b_i = cluster.intra_node_latency, cluster.intra_node_bandwidth
    if calibration is not None and kind in calibration.collectives:
        a_i, b_i = calibration.collectives[kind]
    beta = b_i if span == 1 else min(b_i, group_size // span * cluster.inter_node_bandwidth)
    hops_i, hops_e, factor = _terms(kind, group_size, span, algorithm)
    return hops_i * a_i + hops_e * cluster.inter_node_latency + factor * nbytes / beta


def best_time(kind: str, nbytes: float, group_size: int, cluster: Cluster, span: int = 1,
              calibration: "Calibration | None" = None) -> float:
    """The faster of ring and tree where both exist (what NCCL's tuner picks)."""
    algos = ("ring", "tree") if kind in ("all_reduce", "broadcast") else ("ring",)
    return min(collective_time(kind, nbytes, group_size, cluster, span, a, calibration) for a in algos)


def fit_alpha_beta(points: Sequence[Sequence[float]], kind: str = "send",
                   algorithm: str = "ring") -> tuple[float, float]:
    """Least-squares (α, β) of one link from measured (bytes, seconds) or (bytes, seconds,
    group_size) points of one collective kind (within one node): the model
    t = A(p)·α + B(p)·n·(1/β) is linear in (α, 1/β) (A, B: collective_time's coefficients),
    so the normal equations give both; synthetic points are recovered exactly."""
    rows, ts = [], []
    for pt in points:
        n, t, p = (pt[0], pt[1], pt[2] if len(pt) > 2 else 2)
        hops_i, _, factor = _terms(kind, int(p), 1, algorithm)
        rows.append((hops_i, factor * n))
        ts.append(t)
    s_aa = sum(a * a for a, _ in rows)
    s_ab = sum(a * b for a, b in rows)
    s_bb = sum(b * b for _, b in rows)
    det = s_aa * s_bb - s_ab * s_ab
    if len(rows) < 2 or det <= 1e-12 * max(s_aa * s_bb, 1e-300):
        raise ValueError(f"fit_alpha_beta needs at least two points of different sizes, got {len(rows)} point(s)")
    s_at = sum(a * t for (a, _), t in zip(rows, ts))
    s_bt = sum(b * t for (_, b), t in zip(rows, ts))
    alpha, inv_beta = (s_bb * s_at - s_ab * s_bt) / det, (s_aa * s_bt - s_ab * s_at) / det
    if inv_beta <= 0:
        raise ValueError("fit_alpha_beta: the measured times do not grow with the message size; "
                         "measure larger messages")
    return alpha, 1.0 / inv_beta
