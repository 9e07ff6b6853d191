"""The time context parallelism adds to a step, for ltk/parallel/simulator.py: ring attention's
sends overlapped with the attention of the block at hand, Ulysses' all-to-alls on the critical
path, and the slowest rank's extra attention under the contiguous causal split (the bytes and
the work counts are ltk/parallel/cost_cp.py's).

Ring (Liu et al. 2023, "Ring Attention"). A layer's forward runs c steps; at each of the
first c-1 a rank attends its Q to the K/V block it holds while that block travels on to the
next rank and the next one arrives; the last step only computes:

    t_layer,F = (c-1)·max(t_blk, t_send) + t_blk        exposed_F = (c-1)·max(0, t_send - t_blk)

t_blk: one step's causal attention — the layer's attention FLOPs on this rank as PaLM counts
them (forward 4·h·T per token over the full T x T matrix, h/t heads' width), halved because the
causal kernel skips the masked half (a zig-zag step attends exactly half a block's pairs), cut
in c steps. The backward computes 2·t_blk per step while K, V and the traveling dK/dV go on (two
messages); the last hop of the dK/dV home follows the last step, so it shows:

    exposed_B = (c-1)·max(0, t_kv + t_dkv - 2·t_blk) + t_dkv

Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses"): 4 all-to-alls per layer forward and 4
backward, each waited for (attention needs its heads, the output projection its sequence):
all exposed. One all-to-all of n local bytes on c ranks, g of them per node (pairwise exchange;
within a node over NVSwitch, across nodes through the rank's NIC):

    t = (c-1)·α + max((g-1)/c · n/β_intra, (c-g)/c · n/β_inter)     α: α_inter if it spans nodes

The CP group is c ranks t apart (mesh pp x dp x cp x tp, tp innermost): within a node while
c·t <= devices per node; a ring crossing nodes steps at the pace of its inter-node hop.

Contiguous split: the slowest rank does (2c-1)/c of the mean attention work
(cost_cp.score_blocks), i.e. (c-1)/c of the attention time more; zig-zag and Ulysses none.
Full recomputation re-runs the forward's communication and attention in the backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ltk.parallel import cost_cp
from ltk.parallel.cluster import Cluster
from ltk.parallel.collectives import collective_time


@dataclass(frozen=True)
class CPTimes:
    """Seconds per micro-batch on one device."""

    forward_exposed: float = 0.0
    backward_exposed: float = 0.0  # with recomputation, the forward's re-run included
    issued: float = 0.0  # CP communication issued, hidden or not
    forward_imbalance: float = 0.0  # extra attention compute of the slowest rank (contiguous split)
    backward_imbalance: float = 0.0


def all_to_all_time(nbytes: float, group: int, cluster: Cluster, span: int = 1) -> float:
    """Seconds of one all-to-all of `nbytes` local bytes per rank on `group` ranks over `span` nodes."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    g = math.ceil(group / span)
    alpha = cluster.inter_node_latency if span > 1 else cluster.intra_node_latency
    intra = (g - 1) / group * nbytes / cluster.intra_node_bandwidth
    inter = (group - g) / group * nbytes / cluster.inter_node_bandwidth
    return (group - 1) * alpha + max(intra, inter)


def ring_layer_exposed(t_blk: float, t_send: float, t_kv: float, t_dkv: float, cp: int) -> tuple[float, float]:
    """(forward, backward) exposed seconds of one layer's ring (module docstring)."""
    if cp <= 1:
        return 0.0, 0.0
    return (cp - 1) * max(0.0, t_send - t_blk), (cp - 1) * max(0.0, t_kv + t_dkv - 2 * t_blk) + t_dkv


def cp_times(cluster: Cluster, *, cp: int, impl: str, split: str, tp: int, span: int, layers: int, batch: int,
             seq: int, hidden: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, dkv_bytes: int,
             flop_s: float, recompute: bool, calibration=None) -> CPTimes:
    """CP's seconds per micro-batch on the slowest device: `layers` on this stage, `seq` the padded
    T', `span` the nodes the CP group covers, flop_s seconds per FLOP at the achieved rate."""
    if cp <= 1:
        return CPTimes()
    attn_f = 4.0 * batch * (seq / cp) * seq * hidden / tp * flop_s  # one layer's forward attention, PaLM's count
    per = cost_cp.comm_bytes_per_layer(seq, batch, heads, kv_heads, head_dim, cp, impl, tp, dtype_bytes, dkv_bytes)
    if impl == "ring":
        kv = per["forward"]["send"] / (cp - 1)  # one K + V shard
        dkv = per["backward"]["send"] / (cp - 1) - kv
        hop = 2 if span > 1 else 1

        def send(n: float) -> float:
            return collective_time("send", n, 2, cluster, hop, calibration=calibration)

        t_blk = attn_f / 2 / cp
        fwd, bwd = ring_layer_exposed(t_blk, send(kv), send(kv), send(dkv), cp)
        issued_f, issued_b = (cp - 1) * send(kv), (cp - 1) * (send(kv) + send(dkv))
    else:  # 4 all-to-alls each way, of q, k, v, out (dO, dQ, dK, dV), none hidden
        local = batch * (seq // cp) * head_dim * dtype_bytes
        sizes = [local * heads // tp] * 2 + [local * cp * cost_cp.kv_heads_per_rank(kv_heads, tp, cp)] * 2
        fwd = bwd = issued_f = issued_b = sum(all_to_all_time(n, cp, cluster, span) for n in sizes)
    extra = attn_f * (cp - 1) / cp if impl == "ring" and split == "contiguous" else 0.0
    again = 1 if recompute else 0
    return CPTimes(forward_exposed=layers * fwd, backward_exposed=layers * (bwd + again * fwd),
                   issued=layers * (issued_f * (1 + again) + issued_b),
                   forward_imbalance=layers * extra, backward_imbalance=layers * extra * (2 + again))
