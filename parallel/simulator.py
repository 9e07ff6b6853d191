"""What one training step costs at scale: a calibrated simulator of DP x TP x PP (+ ZeRO) on a
cluster (parallel/cluster.py), built from the closed forms of parallel/cost.py, the pipeline
event simulator of parallel/pipeline_sim.py and an alpha-beta model of the collectives.

    from models.llama import llama_config
    from parallel.cluster import load_cluster
    from parallel.simulator import Strategy, simulate
    p = simulate(llama_config("llama-8b"), load_cluster("dgx-h100", 64),
                 Strategy(dp=64, zero=3, global_batch=128, seq_len=4096))
    print(p.step_time, p.mfu, p.comm_exposed)

Step time (per optimizer step, the slowest device; m micro-batches of b sequences per replica):

    step = m·(t_F + t_B)            compute, F/B of one micro-batch on one device (+ TP comm)
         + bubble                   pipeline fill and drain
         + exposed p2p              pipeline messages on the critical path
         + exposed DP / ZeRO comm   what the backward (or forward) could not hide

Compute: model FLOPs per token F = 6N + 12·L·d·T (models/*.flops_per_token, PaLM app. B); a
device does F·b·T/(tp·pp) per micro-batch, a third forward, two thirds backward; activation
checkpointing re-runs the blocks' forward in the backward (+ (F - 6·V·d)/3 per token). Time =
FLOPs / (peak · efficiency); the efficiency is what fraction of the datasheet peak the kernels
reach. It comes from a Calibration (measured), or DEFAULT_EFFICIENCY = 0.5 — a plausible
figure for large bf16 matmuls plus the memory-bound ops between them, *not* a measurement.

Overlap: tensor-parallel collectives sit on the critical path (each layer waits for them);
DP gradient buckets overlap the last backward, ZeRO-3 gathers overlap the layer before
(prefetch); pipeline sends are asynchronous and cost only where a stage waits for one.

    MFU = F · tokens per step / (step · peak · devices)      (hfu also counts the recompute)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from parallel import cost, pipeline_sim
from parallel.cluster import Cluster
from parallel.plan import model_shape, params_per_rank
from parallel.schedules import SCHEDULES, make_schedule

DEFAULT_EFFICIENCY = 0.5
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send")
EVENT_SIM_MAX_ACTIONS = 20_000  # above this the closed forms replace the event simulator (~0.3 s)


# == collectives: the alpha-beta model ====================================================
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
    """Seconds for one collective of `nbytes` payload (parallel/dist.py: the whole buffer for
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


# == calibration, strategy, prediction ====================================================
@dataclass(frozen=True)
class Calibration:
    """Measured numbers that replace the cluster's datasheet ones: the FLOP/s a device reaches
    on the training step (or that rate as a fraction of peak), and (α, β) per collective kind
    measured within one node."""

    achieved_flops: float | None = None
    efficiency: float | None = None
    collectives: dict[str, tuple[float, float]] = field(default_factory=dict)

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


@dataclass(frozen=True)
class Strategy:
    """One parallel layout of one step. The mesh is pp x dp x tp, tp innermost (parallel/dist.py);
    each of the dp replicas runs `micro_batches` micro-batches of global_batch/(dp·m) sequences."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0  # 0 = DDP, 1/2/3 = ZeRO stage over the dp axis
    micro_batches: int = 1
    virtual_stages: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    global_batch: int = 8  # sequences per optimizer step
    seq_len: int = 2048
    dtype: str = "bf16"
    flash: bool = True
    bucket_bytes: int = 25 * 2**20  # DDP / ZeRO-1/2 gradient bucket (torch DDP's 25 MiB)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch // (self.dp * self.micro_batches)

    def validate(self) -> None:
        for k in ("dp", "tp", "pp", "micro_batches", "virtual_stages", "global_batch", "seq_len", "bucket_bytes"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"strategy.{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.zero not in cost.ZERO_STAGES:
            raise ValueError(f"strategy.zero must be one of {cost.ZERO_STAGES}, got {self.zero!r}")
        if self.global_batch % (self.dp * self.micro_batches):
            raise ValueError(f"global_batch {self.global_batch} does not split into dp {self.dp} x "
                             f"{self.micro_batches} micro-batches")
        if self.virtual_stages > 1 and (self.schedule != "interleaved" or self.pp == 1):
            raise ValueError(f"virtual_stages={self.virtual_stages} needs schedule='interleaved' and pp > 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {self.schedule!r}; known: {sorted(SCHEDULES)}")
        if self.pp > 1 and self.schedule == "interleaved" and self.micro_batches % self.pp:
            raise ValueError(f"interleaved 1F1B needs micro_batches ({self.micro_batches}) to be a multiple "
                             f"of pp ({self.pp})")


@dataclass
class Prediction:
    world: int
    cluster: str
    strategy: Strategy
    step_time: float  # seconds per optimizer step
    compute: float  # seconds a device computes (incl. recomputation)
    comm_exposed: dict[str, float]  # seconds on the critical path, by parallelism
    comm_total: dict[str, float]  # seconds of communication issued, hidden or not
    bubble: float  # seconds a device idles in the pipeline fill and drain
    bubble_fraction: float  # idle / ideal (parallel/cost.bubble_fraction's quantity)
    bubble_source: str  # "event simulator", "closed form" or "none"
    mfu: float
    hfu: float
    tokens_per_s: float
    memory: dict[str, int]  # bytes per device: params, grads, optimizer, activations, total
    fits: bool
    efficiency: float
    efficiency_source: str

    def to_dict(self) -> dict:
        return {**asdict(self), "strategy": asdict(self.strategy)}


# == the step ==============================================================================
def _family(cfg) -> str:
    kind = {"GPTConfig": "gpt", "LlamaConfig": "llama"}.get(type(cfg).__name__)
    if kind is None:
        raise ValueError(f"the simulator covers GPTConfig and LlamaConfig models, got {type(cfg).__name__}")
    return kind


def _flops_per_token(family: str, cfg, seq_len: int) -> float:
    from models import gpt, llama

    return (gpt if family == "gpt" else llama).flops_per_token(cfg, seq_len)


def _span(size: int, stride: int, devices_per_node: int) -> int:
    """Nodes covered by a group of `size` ranks `stride` apart (rank = (pp·dp + dp_i)·tp + tp_i)."""
    return len({i * stride // devices_per_node for i in range(size)})


def _overlapped(total: float, k: int, window: float) -> float:
    """Exposed time of k equal messages (total seconds, sent one after another) whose data
    becomes ready evenly over a compute window W, message i at i·W/k. The last one finishes at
    max_i(i·W/k + (k-i+1)·c), c = total/k, so beyond W it is exposed max(c, total - W·(k-1)/k):
    only the last bucket when the link keeps up, the excess when it does not."""
    return 0.0 if total <= 0 else max(total / k, total - window * (k - 1) / k)


def peak_in_flight(st: Strategy) -> int:
    """Chunk-activations rank 0 holds at its peak (parallel/schedules.py warm-ups): 1 without a
    pipeline, GPipe m, 1F1B min(p, m), interleaved min(2(p-1) + (v-1)·p + 1, v·m)."""
    p, m, v = st.pp, st.micro_batches, st.virtual_stages
    if p == 1:
        return 1
    if st.schedule == "gpipe":
        return m
    if st.schedule == "1f1b" or v == 1:
        return min(p, m)
    return min(2 * (p - 1) + (v - 1) * p + 1, v * m)


def memory_per_device(cfg, st: Strategy) -> dict[str, int]:
    """Bytes on the largest device: model states by ZeRO stage (cost.model_state_bytes of
    plan.params_per_rank), activations by Korthikanti et al. (cost.activation_bytes_per_layer,
    16-bit accounting, x2 in fp32) for one micro-batch, times the layers of a chunk and the
    chunks in flight (peak_in_flight), plus the fp32 logits of the last stage: the accounting
    of parallel/plan.py, with the micro-batch of b = global_batch/(dp·m) sequences."""
    family = _family(cfg)
    shape, prec = model_shape(family, cfg), cost.Precision.of(st.dtype)
    states = cost.model_state_bytes(params_per_rank(shape, st.tp, st.pp), st.dp, st.zero, prec)
    b, T = st.micro_batch_size, st.seq_len
    scale = 2.0 if st.dtype == "fp32" else 1.0  # Korthikanti counts 2-byte activations
    layer = cost.activation_bytes_per_layer(T, b, shape.hidden, shape.heads, st.tp, st.sequence_parallel,
                                            st.activation_checkpointing, st.flash) * scale
    chunk_layers = math.ceil(shape.layers / (st.pp * (st.virtual_stages if st.schedule == "interleaved" else 1)))
    activations = int(layer * chunk_layers * peak_in_flight(st) + b * T * shape.vocab // st.tp * 4)
    return {**states, "activations": activations, "total": sum(states.values()) + activations}


def _pipeline(st: Strategy, t_f: float, t_b: float, t_msg: float) -> tuple[float, float, str]:
    """(bubble seconds, exposed p2p seconds, source). The event simulator when the schedule is
    small enough; else the closed forms: bubble (p-1)(t_F + t_B)/v (Narayanan et al. 2021
    §2.2), and the p2p latency on the critical path as the event simulator shows it: 2(p·v - 1)
    messages for GPipe and interleaved (fill and drain cross every boundary once each way), and
    2(p-1)·m/p + 2(p-2) for 1F1B with m >= p, whose lock-step steady state waits for a round
    trip every micro-batch. The closed forms hold while a message takes less than a chunk's
    forward (the regime of real models; a tiny model on a slow link needs the simulator)."""
    p, m = st.pp, st.micro_batches
    v = st.virtual_stages if st.schedule == "interleaved" else 1
    if p == 1:
        return 0.0, 0.0, "none"
    ideal = m * (t_f + t_b)
    if 2 * p * v * m <= EVENT_SIM_MAX_ACTIONS:
        sched = make_schedule(st.schedule, p, m, v)
        base = pipeline_sim.simulate(sched, t_f / v, t_b / v).makespan
        late = pipeline_sim.simulate(sched, t_f / v, t_b / v, t_msg).makespan if t_msg > 0 else base
        return base - ideal, late - base, "event simulator"
    lockstep = st.schedule == "1f1b" or (st.schedule == "interleaved" and v == 1)
    hops = 2 * (p - 1) * m / p + 2 * (p - 2) if lockstep and m >= p else 2 * (p * v - 1)
    return (p - 1) * (t_f + t_b) / v, hops * t_msg, "closed form"


def simulate(model_cfg, cluster: Cluster, strategy: Strategy, calibration: Calibration | None = None) -> Prediction:
    """Predict one optimizer step of `strategy` on `cluster` (module docstring for the model)."""
    st, family = strategy, _family(model_cfg)
    st.validate()
    if st.world > cluster.devices:
        raise ValueError(f"the strategy needs {st.world} devices (dp {st.dp} x tp {st.tp} x pp {st.pp}); "
                         f"cluster {cluster.name!r} has {cluster.devices}")
    shape, prec, dpn = model_shape(family, model_cfg), cost.Precision.of(st.dtype), cluster.devices_per_node
    if shape.heads % st.tp:
        raise ValueError(f"tp={st.tp} does not divide the {shape.heads} attention heads")
    eff = calibration.efficiency_for(cluster) if calibration is not None else None
    if eff is None:
        eff, eff_source = DEFAULT_EFFICIENCY, f"default {DEFAULT_EFFICIENCY} (not measured)"
    else:
        eff_source = "given" if calibration.efficiency is not None else "measured"
    if not 0 < eff <= 1:
        raise ValueError(f"compute efficiency must be in (0, 1], got {eff:.3g}")
    m, b, T, v = st.micro_batches, st.micro_batch_size, st.seq_len, st.virtual_stages
    F = _flops_per_token(family, model_cfg, T)
    R = (F - 6.0 * shape.vocab * shape.hidden) / 3 if st.activation_checkpointing else 0.0  # re-run forward
    per_device = b * T / (st.tp * st.pp) / (cluster.peak_flops * eff)  # seconds per FLOP-per-token
    fwd, bwd = F / 3 * per_device, (2 * F / 3 + R) * per_device

    # tensor parallel: every collective of one micro-batch (cost.tp_comm_bytes' list), not overlapped
    calls: dict[tuple[str, int], int] = {}
    if st.tp > 1:
        for op, n in cost._tp_collectives(b, T, shape.hidden, math.ceil(shape.layers / st.pp),
                                          sequence_parallel=st.sequence_parallel, dtype_bytes=prec.param,
                                          arch=family, bias=shape.block_split_vector > 0, positions=shape.positions):
            calls[(op, n)] = calls.get((op, n), 0) + 1
    tp_span = _span(st.tp, 1, dpn)
    t_tp = sum(c * best_time(op, n, st.tp, cluster, tp_span, calibration) for (op, n), c in calls.items())
    t_f, t_b = fwd + t_tp / 2, bwd + t_tp / 2 * (2 if st.activation_checkpointing else 1)  # recompute re-issues

    # pipeline: one (b, T, h) activation per boundary, sent as 1/tp slices (Megatron's scatter/gather,
    # Narayanan et al. 2021 §4.1); the tied embedding's gradient all-reduce between first and last stage
    stride = st.dp * st.tp
    t_msg = collective_time("send", b * T * shape.hidden * prec.param / st.tp, 2, cluster,
                            _span(2, stride, dpn), calibration=calibration) if st.pp > 1 else 0.0
    bubble, p2p, source = _pipeline(st, t_f, t_b, t_msg)
    tied = 0.0
    if st.pp > 1 and shape.tied:
        tied = best_time("all_reduce", shape.vocab * shape.hidden // st.tp * prec.param, 2, cluster,
                         _span(2, (st.pp - 1) * stride, dpn), calibration)
    v_eff = v if st.schedule == "interleaved" else 1
    p2p_issued = (2 * v_eff * m * t_msg if st.pp > 1 else 0.0) + tied

    # data parallel / ZeRO over dp ranks `tp` apart (cost.zero_comm_bytes' collectives)
    dp_total = dp_exposed = 0.0
    if st.dp > 1:
        psi = params_per_rank(shape, st.tp, st.pp)
        G, P, span = psi * prec.grad, psi * prec.param, _span(st.dp, st.tp, dpn)

        def timed(kind: str, nbytes: float, k: int) -> float:
            return k * best_time(kind, nbytes / k, st.dp, cluster, span, calibration)

        window = t_b / v_eff  # the last backward (the last chunk's, interleaved)
        k_g, k_p = max(1, math.ceil(G / st.bucket_bytes)), max(1, math.ceil(P / st.bucket_bytes))
        if st.zero == 0:
            dp_total = timed("all_reduce", G, k_g)
            dp_exposed = _overlapped(dp_total, k_g, window)
        elif st.zero in (1, 2):  # ZeRO-2 reduce-scatters every micro-batch, each under its backward
            times, rs, ag = (1 if st.zero == 1 else m), timed("reduce_scatter", G, k_g), timed("all_gather", P, k_p)
            dp_total, dp_exposed = times * rs + ag, times * _overlapped(rs, k_g, window) + ag
        else:  # ZeRO-3: a layer's gather prefetched under the previous layer, forward and backward
            units = math.ceil(shape.layers / st.pp)
            ag, rs = timed("all_gather", P, units), timed("reduce_scatter", G, units)
            dp_total = m * (2 * ag + rs)
            dp_exposed = m * (_overlapped(ag, units, t_f) + _overlapped(ag + rs, units, t_b))

    ideal = m * (t_f + t_b)
    step = ideal + bubble + p2p + tied + dp_exposed
    tp_time = m * t_tp * (1.5 if st.activation_checkpointing else 1.0)
    tokens = st.global_batch * T
    mem = memory_per_device(model_cfg, st)
    return Prediction(
        world=st.world, cluster=cluster.name, strategy=st, step_time=step, compute=m * (fwd + bwd),
        comm_exposed={"tensor_parallel": tp_time, "pipeline": p2p + tied, "data_parallel": dp_exposed},
        comm_total={"tensor_parallel": tp_time, "pipeline": p2p_issued, "data_parallel": dp_total},
        bubble=bubble, bubble_fraction=bubble / ideal, bubble_source=source,
        mfu=F * tokens / (step * cluster.peak_flops * st.world),
        hfu=(F + R) * tokens / (step * cluster.peak_flops * st.world),
        tokens_per_s=tokens / step, memory=mem, fits=mem["total"] <= cluster.memory_bytes,
        efficiency=eff, efficiency_source=eff_source)


# == projection ===========================================================================
def weak_scaling(worlds: Sequence[int] = (8, 16, 32, 64, 128, 256, 512, 1024), *, tp: int = 1, pp: int = 1,
                 micro_batches: int = 1, micro_batch_size: int = 1, **fields) -> dict[int, Strategy]:
    """One Strategy per world size with a fixed tp x pp and a fixed batch per replica (the
    global batch grows with dp = world/(tp·pp)); `fields` set the other Strategy fields."""
    out = {}
    for w in worlds:
        if w % (tp * pp):
            raise ValueError(f"world {w} is not divisible by tp x pp = {tp * pp}")
        dp = w // (tp * pp)
        out[w] = Strategy(dp=dp, tp=tp, pp=pp, micro_batches=micro_batches,
                          global_batch=dp * micro_batches * micro_batch_size, **fields)
    return out


def project(model_cfg, cluster: Cluster, strategies_by_world: dict[int, Strategy],
            calibration: Calibration | None = None) -> list[Prediction]:
    """simulate() at each world size, on `cluster`'s node type with as many nodes as needed."""
    out = []
    for w, st in sorted(strategies_by_world.items()):
        if st.world != w:
            raise ValueError(f"the strategy for world {w} uses {st.world} devices")
        out.append(simulate(model_cfg, cluster.scaled(w), st, calibration))
    return out


def plot_projection(preds: Sequence[Prediction], path: str, title: str = "") -> str:
    """Step time, MFU and tokens/s against devices (log2 axis), one panel each; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p.world for p in preds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [("step time (s)", [p.step_time for p in preds]), ("MFU (%)", [100 * p.mfu for p in preds]),
              ("tokens / s", [p.tokens_per_s for p in preds])]
    for ax, (label, ys) in zip(axes, series):
        ax.plot(n, ys, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 100)
    axes[2].set_yscale("log")
    fig.suptitle(title or f"predicted on {preds[0].cluster}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# == a sanity check against published runs ===================================================
@dataclass(frozen=True)
class PublishedRun:
    """A row of Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
    Clusters Using Megatron-LM" (SC'21, arXiv 2104.04473), table 1: GPT models, vocabulary
    51,200, sequence 2048, on DGX A100 nodes (Selene: 8 x A100 80GB, 8 x HDR 200 Gb/s IB per
    node), mixed precision, full activation recomputation, no ZeRO. The published rate counts
    the recomputed forward (their eq. 3: 96·B·s·l·h²·(1 + s/6h + V/16lh)): compare with `hfu`.
    Not in the table, assumed here: micro-batch size 1 and the interleaved schedule with
    `virtual` chunks per rank (Megatron's choice for these runs; v = 1 where pp = 1)."""

    name: str
    layers: int
    hidden: int
    heads: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops_per_gpu: float  # published, counting recomputation
    percent_of_peak: float  # published, of 312 TFLOP/s
    virtual: int = 1

    def config(self):
        from models.gpt import GPTConfig

        return GPTConfig(vocab_size=51200, block_size=2048, n_layer=self.layers, n_head=self.heads, n_embd=self.hidden)

    def strategy(self) -> Strategy:
        dp = self.gpus // (self.tp * self.pp)
        return Strategy(dp=dp, tp=self.tp, pp=self.pp, micro_batches=self.batch // dp, virtual_stages=self.virtual,
                        schedule="interleaved" if self.virtual > 1 else "1f1b", activation_checkpointing=True,
                        global_batch=self.batch, seq_len=2048, dtype="bf16", flash=False)


MEGATRON_2021 = (
    PublishedRun("18.4B", 40, 6144, 48, 8, 1, 256, 1024, 135, 43),
    PublishedRun("145.6B", 80, 12288, 96, 8, 8, 1536, 2304, 148, 47, virtual=2),
    PublishedRun("529.6B", 105, 20480, 128, 8, 35, 2520, 2520, 163, 52, virtual=3),
    PublishedRun("1T", 128, 25600, 160, 8, 64, 3072, 3072, 163, 52, virtual=2),
)


def megatron_check(efficiency: float = DEFAULT_EFFICIENCY, runs: Sequence[PublishedRun] = MEGATRON_2021) -> list[dict]:
    """Predicted vs published utilization of each run on dgx-a100 nodes at `efficiency`, and
    the efficiency at which the prediction would equal the publication (bisection on hfu)."""
    from parallel.cluster import dgx_a100

    out = []
    for r in runs:
        cfg, st, cluster = r.config(), r.strategy(), dgx_a100(math.ceil(r.gpus / 8))

        def hfu(e: float) -> Prediction:
            return simulate(cfg, cluster, st, Calibration(efficiency=e))

        p = hfu(efficiency)
        lo, hi = 0.05, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if hfu(mid).hfu < r.percent_of_peak / 100 else (lo, mid)
        out.append({"run": r.name, "gpus": r.gpus, "published_hfu": r.percent_of_peak / 100, "predicted_hfu": p.hfu,
                    "predicted_mfu": p.mfu, "step_time_s": p.step_time, "bubble_fraction": p.bubble_fraction,
                    "exposed_comm_s": p.comm_exposed, "memory_gib": p.memory["total"] / 2**30, "fits": p.fits,
                    "efficiency": efficiency, "implied_efficiency": (lo + hi) / 2})
    return out


# == calibration on this machine =============================================================
def _measure_worker(rank: int, world: int, sizes: Sequence[int], repeats: int, matmul_n: int,
                    statistic: str = "min", device: str = "cpu", matmul_s: float = 0.5) -> dict:
    import statistics
    import time

    import torch

    from parallel.dist import Comm

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
    # the matmul rate while every rank computes at once, over the same wall-clock window, so
    # ranks that share a core each get their share of it
    a, b = torch.randn(matmul_n, matmul_n, device=dev), torch.randn(matmul_n, matmul_n, device=dev)
    for _ in range(8):  # warm-up: thread pools, allocator, clocks
        a @ b
    comm.barrier()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < matmul_s:
        a @ b
        reps += 1
        if reps % 16 == 0:
            sync()
    sync()
    out["flops"] = 2 * matmul_n**3 * reps / (time.perf_counter() - t0)
    return out


def measure_calibration(world: int = 2, sizes: Sequence[int] = (2**12, 2**20, 2**24), repeats: int = 5,
                        matmul_n: int = 256, timeout_s: float = 120, statistic: str = "min",
                        device: str = "cpu") -> Calibration:
    """Measure this machine with `world` gloo processes (parallel.dist.spawn): each collective
    at each size `repeats` times, fitted per kind by fit_alpha_beta, and the matmul rate a
    process reaches while all `world` compute together (the mean over ranks). statistic="min"
    takes the fastest call (noise only adds time: the link's capability); "median" the typical
    call, what a training step meets on a shared machine. world=1 measures the rate alone.
    device="cuda": one GPU per rank on NCCL. A quick, small measurement (a few seconds)."""
    from parallel.dist import spawn

    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    res = spawn(_measure_worker, world, tuple(sizes), repeats, matmul_n, statistic, device, timeout_s=timeout_s,
                device=device)
    flops = sum(r.pop("flops") for r in res) / world
    cal = Calibration.from_measurements(collective_points=res[0])
    return Calibration(achieved_flops=flops, collectives=cal.collectives)


def calibrated_cluster(calibration: Calibration, processes: int = 2) -> Cluster:
    """The cpu-gloo preset with the measured matmul rate as its peak and the measured
    all-reduce link as both its links (one host: there is no second kind of link)."""
    from parallel.cluster import cpu_gloo

    c = cpu_gloo(processes)
    if calibration.achieved_flops:
        c = replace(c, peak_flops=calibration.achieved_flops)
    if "all_reduce" in calibration.collectives:
        a, b = calibration.collectives["all_reduce"]
        c = replace(c, intra_node_latency=a, intra_node_bandwidth=b, inter_node_latency=a, inter_node_bandwidth=b)
    return c
