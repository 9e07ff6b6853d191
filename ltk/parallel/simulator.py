"""What one training step costs at scale: a calibrated simulator of DP x CP x TP x PP (+ ZeRO) on a
cluster (ltk/parallel/cluster.py), built from the closed forms of ltk/parallel/cost.py, the pipeline
event simulator of ltk/parallel/pipeline_sim.py, the alpha-beta model of the collectives
(ltk/parallel/collectives.py) and numbers measured on a machine (ltk/parallel/calibration.py).

    from ltk.models.llama import llama_config
    from ltk.parallel.cluster import load_cluster
    from ltk.parallel.simulator import Strategy, simulate
    p = simulate(llama_config("llama-8b"), load_cluster("dgx-h100", 64),
                 Strategy(dp=64, zero=3, global_batch=128, seq_len=4096))
    print(p.step_time, p.mfu, p.comm_exposed)

Step time (per optimizer step, the slowest device; m micro-batches of b sequences per replica):

    step = m·(t_F + t_B)            compute, F/B of one micro-batch on one device (+ TP comm)
         + bubble                   pipeline fill and drain
         + exposed p2p              pipeline messages on the critical path
         + exposed DP / ZeRO comm   what the backward (or forward) could not hide

Compute: model FLOPs per token F = 6N + 12·L·d·T (ltk/models/*.flops_per_token, PaLM app. B); a
device does F·b·T/(tp·pp) per micro-batch, a third forward, two thirds backward; activation
checkpointing re-runs the blocks' forward in the backward (+ (F - 6·V·d)/3 per token). Time =
FLOPs / (peak · efficiency); the efficiency is what fraction of the datasheet peak the kernels
reach. It comes from a Calibration (measured), or DEFAULT_EFFICIENCY = 0.5 — a plausible
figure for large bf16 matmuls plus the memory-bound ops between them, *not* a measurement.

Overlap, credited only where ltk/parallel/ overlaps (each line names the code):
  * tensor parallel: every collective sits on the critical path (each layer waits for it),
    except the backward f / f̄ of a column-parallel linear that owns it (tensor.py
    `_ColumnLinear`): its dX all-reduce (reduce-scatter under SP) runs beside the weight-gradient
    GEMM and hides min(t_collective, t_GEMM). GPT: c_attn, c_fc of every layer and the head;
    Llama's q/k/v and gate/up share one f, so only its head overlaps (`_tp_hidden`).
  * DDP (ddp.py): gradient buckets all-reduced during the last micro-batch's backward.
  * ZeRO-1/2 (zero.py): gradient buckets reduce-scattered during the backward (ZeRO-1: the last
    micro-batch's, ZeRO-2: every micro-batch's); the parameter all-gather, one call per bucket
    launched at step(), waited for by the next forward: hidden under it the same way.
  * ZeRO-3 (zero3.py): a unit's gather prefetched under the previous unit, forward and backward;
    its reduce-scatter under the rest of the backward.
  * pipeline: sends are asynchronous and cost only where a stage waits for one; the data-parallel
    all-reduce of a pipeline (pipeline_run.py) runs after the schedule, one call, all exposed.
  * context parallel (ltk/parallel/simulator_cp.py): ring attention's K/V sends under the attention
    of the block at hand, Ulysses' all-to-alls exposed. A device computes on its T'/cp tokens (T'
    the padded length, cost_cp.padded_seq_len); the gradient reduction runs over the dp x cp
    ranks that replicate the parameters, and ZeRO shards over them (plan.py's docstring).

    MFU = F · tokens per step / (step · peak · devices)      (hfu also counts the recompute)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from ltk.parallel import cost, cost_cp, pipeline_sim
from ltk.parallel.calibration import Calibration, calibrated_cluster, measure_calibration  # noqa: F401 (re-exported)
from ltk.parallel.cluster import Cluster
from ltk.parallel.collectives import KINDS, best_time, collective_time, fit_alpha_beta  # noqa: F401 (re-exported)
from ltk.parallel.plan import attention_dims, gathered_bytes, model_shape, params_per_rank
from ltk.parallel.schedules import SCHEDULES, make_schedule
from ltk.parallel.simulator_cp import cp_times

DEFAULT_EFFICIENCY = 0.5
EVENT_SIM_MAX_ACTIONS = 20_000  # above this the closed forms replace the event simulator (~0.3 s)


@dataclass(frozen=True)
class Strategy:
    """One parallel layout of one step. The mesh is pp x dp x cp x tp, tp innermost (ltk/parallel/dist.py);
    each of the dp replicas runs `micro_batches` micro-batches of global_batch/(dp·m) sequences,
    each sequence split over its cp ranks (cp_impl ring or ulysses; the ring's split zigzag or
    contiguous)."""

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
    cp: int = 1  # context parallel: ranks one sequence is split over
    cp_impl: str = "ring"  # ring | ulysses
    cp_split: str = "zigzag"  # the ring's causal split: zigzag (balanced) | contiguous
    cp_dkv_bytes: int = 0  # bytes per dK/dV element on the ring's backward (0: fp32, as ring_attention keeps them)

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def local_seq_len(self) -> int:
        """T'/cp: tokens of one sequence on one device (T' padded for the split, cost_cp.padded_seq_len)."""
        return cost_cp.padded_seq_len(self.seq_len, self.cp, self.cp_impl, self.cp_split) // self.cp

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch // (self.dp * self.micro_batches)

    def validate(self) -> None:
        for k in ("dp", "tp", "pp", "micro_batches", "virtual_stages", "global_batch", "seq_len", "bucket_bytes", "cp"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"strategy.{k} must be a positive integer, got {getattr(self, k)!r}")
        cost_cp.padded_seq_len(self.seq_len, self.cp, self.cp_impl, self.cp_split)  # names a bad impl / split
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
    bubble_fraction: float  # idle / ideal (ltk/parallel/cost.bubble_fraction's quantity)
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
    from ltk.models import gpt, llama

    return (gpt if family == "gpt" else llama).flops_per_token(cfg, seq_len)


def _span(size: int, stride: int, devices_per_node: int) -> int:
    """Nodes covered by a group of `size` ranks `stride` apart (rank = ((pp_i·dp + dp_i)·cp + cp_i)·tp + tp_i)."""
    return len({i * stride // devices_per_node for i in range(size)})


def _overlapped(total: float, k: int, window: float) -> float:
    """Exposed time of k equal messages (total seconds, sent one after another) whose data
    becomes ready evenly over a compute window W, message i at i·W/k. The last one finishes at
    max_i(i·W/k + (k-i+1)·c), c = total/k, so beyond W it is exposed max(c, total - W·(k-1)/k):
    only the last bucket when the link keeps up, the excess when it does not."""
    return 0.0 if total <= 0 else max(total / k, total - window * (k - 1) / k)


def _tp_hidden(family: str, shape, st: Strategy, t_collective: float, flop_s: float) -> float:
    """Seconds of tensor-parallel communication one micro-batch hides on one device: each
    column-parallel linear that owns its f (ltk/parallel/tensor.py `_ColumnLinear`) computes its
    weight gradient, 2·b·T·(in·out)/tp FLOPs, while its dX collective of t_collective seconds
    travels, hiding min(t_collective, t_GEMM). GPT: c_attn (3h·h) and c_fc (4h·h) in each of the
    stage's layers, plus the head (V·h); Llama: the head only. flop_s: seconds per FLOP."""
    b, T, h = st.micro_batch_size, st.local_seq_len, shape.hidden
    gemm = lambda weights: 2 * b * T * weights / st.tp * flop_s  # noqa: E731
    layers = math.ceil(shape.layers / st.pp) if family == "gpt" else 0
    per_layer = min(t_collective, gemm(3 * h * h)) + min(t_collective, gemm(4 * h * h))
    return layers * per_layer + min(t_collective, gemm(shape.vocab * h))


def peak_in_flight(st: Strategy) -> int:
    """Chunk-activations rank 0 holds at its peak (ltk/parallel/schedules.py warm-ups): 1 without a
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
    chunks in flight (peak_in_flight), plus the fp32 logits of the last stage, plus ZeRO-3's
    gathered units (plan.gathered_bytes): the accounting
    of ltk/parallel/plan.py, with the micro-batch of b = global_batch/(dp·m) sequences. With cp > 1
    the layers and logits hold T'/cp tokens, the CP buffers at the peak (cost_cp.peak_buffer_bytes)
    are added to the activations, and ZeRO shards over dp·cp."""
    family = _family(cfg)
    shape, prec = model_shape(family, cfg), cost.Precision.of(st.dtype)
    states = cost.model_state_bytes(params_per_rank(shape, st.tp, st.pp), st.dp * st.cp, st.zero, prec)
    b, T = st.micro_batch_size, st.local_seq_len
    scale = 2.0 if st.dtype == "fp32" else 1.0  # Korthikanti counts 2-byte activations
    layer = cost.activation_bytes_per_layer(T, b, shape.hidden, shape.heads, st.tp, st.sequence_parallel,
                                            st.activation_checkpointing, st.flash) * scale
    chunk_layers = math.ceil(shape.layers / (st.pp * (st.virtual_stages if st.schedule == "interleaved" else 1)))
    activations = int(layer * chunk_layers * peak_in_flight(st) + b * T * shape.vocab // st.tp * 4)
    heads, kv_heads, head_dim = attention_dims(family, cfg)
    activations += cost_cp.peak_buffer_bytes(T * st.cp, b, heads, kv_heads, head_dim, st.cp, st.cp_impl, st.tp,
                                             prec.param, st.cp_dkv_bytes or None)
    gathered = gathered_bytes(shape, st.tp, prec) if st.zero == 3 and st.dp * st.cp > 1 else 0  # ZeRO-3's units
    return {**states, "activations": activations, "gathered": gathered,
            "total": sum(states.values()) + activations + gathered}


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
        raise ValueError(f"the strategy needs {st.world} devices (dp {st.dp} x cp {st.cp} x tp {st.tp} x pp {st.pp}); "
                         f"cluster {cluster.name!r} has {cluster.devices}")
    shape, prec, dpn = model_shape(family, model_cfg), cost.Precision.of(st.dtype), cluster.devices_per_node
    if shape.heads % st.tp:
        raise ValueError(f"tp={st.tp} does not divide the {shape.heads} attention heads")
    heads, kv_heads, head_dim = attention_dims(family, model_cfg)
    cost_cp.check_cp(st.cp, st.cp_impl, heads, kv_heads, st.tp)
    eff = calibration.efficiency_for(cluster) if calibration is not None else None
    if eff is None:
        eff, eff_source = DEFAULT_EFFICIENCY, f"default {DEFAULT_EFFICIENCY} (not measured)"
    else:
        eff_source = "given" if calibration.efficiency is not None else "measured"
    if not 0 < eff <= 1:
        raise ValueError(f"compute efficiency must be in (0, 1], got {eff:.3g}")
    m, b, T, v = st.micro_batches, st.micro_batch_size, st.seq_len, st.virtual_stages
    Tl = st.local_seq_len  # tokens of a sequence on a device: T, or T'/cp with context parallelism
    F = _flops_per_token(family, model_cfg, T)
    F_run = _flops_per_token(family, model_cfg, Tl * st.cp)  # what the device computes: the padded T'
    R = (F_run - 6.0 * shape.vocab * shape.hidden) / 3 if st.activation_checkpointing else 0.0  # re-run forward
    per_device = b * Tl / (st.tp * st.pp) / (cluster.peak_flops * eff)  # seconds per FLOP-per-token
    fwd, bwd = F_run / 3 * per_device, (2 * F_run / 3 + R) * per_device

    # tensor parallel: every collective of one micro-batch (cost.tp_comm_bytes' list), not overlapped
    calls: dict[tuple[str, int], int] = {}
    if st.tp > 1:
        for op, n in cost._tp_collectives(b, Tl, shape.hidden, math.ceil(shape.layers / st.pp),
                                          sequence_parallel=st.sequence_parallel, dtype_bytes=prec.param,
                                          arch=family, bias=shape.block_split_vector > 0, positions=shape.positions):
            calls[(op, n)] = calls.get((op, n), 0) + 1
    tp_span = _span(st.tp, 1, dpn)
    t_tp = sum(c * best_time(op, n, st.tp, cluster, tp_span, calibration) for (op, n), c in calls.items())
    hidden = 0.0  # the column-parallel backward's dX collectives under their weight-gradient GEMMs
    if st.tp > 1:
        t_dx = best_time("reduce_scatter" if st.sequence_parallel else "all_reduce",
                         b * Tl * shape.hidden * prec.param, st.tp, cluster, tp_span, calibration)
        hidden = _tp_hidden(family, shape, st, t_dx, 1 / (cluster.peak_flops * eff))
    recompute_tp = 2 if st.activation_checkpointing else 1  # recompute re-issues the forward's
    t_f, t_b = fwd + t_tp / 2, bwd + t_tp / 2 * recompute_tp - hidden

    # context parallel over cp ranks tp apart (ltk/parallel/simulator_cp.py): exposed sends, the contiguous
    # split's extra attention on the slowest device
    cpt = cp_times(cluster, cp=st.cp, impl=st.cp_impl, split=st.cp_split, tp=st.tp, span=_span(st.cp, st.tp, dpn),
                   layers=math.ceil(shape.layers / st.pp), batch=b, seq=Tl * st.cp, hidden=shape.hidden, heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=prec.param,
                   dkv_bytes=st.cp_dkv_bytes or 4, flop_s=1 / (cluster.peak_flops * eff),
                   recompute=st.activation_checkpointing, calibration=calibration)
    fwd, bwd = fwd + cpt.forward_imbalance, bwd + cpt.backward_imbalance
    t_f, t_b = t_f + cpt.forward_imbalance + cpt.forward_exposed, t_b + cpt.backward_imbalance + cpt.backward_exposed

    # pipeline: one (b, T, h) activation per boundary, sent as 1/tp slices (Megatron's scatter/gather,
    # Narayanan et al. 2021 §4.1); the tied embedding's gradient all-reduce between first and last stage
    stride = st.dp * st.cp * st.tp
    t_msg = collective_time("send", b * Tl * shape.hidden * prec.param / st.tp, 2, cluster,
                            _span(2, stride, dpn), calibration=calibration) if st.pp > 1 else 0.0
    bubble, p2p, source = _pipeline(st, t_f, t_b, t_msg)
    tied = 0.0
    if st.pp > 1 and shape.tied:
        tied = best_time("all_reduce", shape.vocab * shape.hidden // st.tp * prec.param, 2, cluster,
                         _span(2, (st.pp - 1) * stride, dpn), calibration)
    v_eff = v if st.schedule == "interleaved" else 1
    p2p_issued = (2 * v_eff * m * t_msg if st.pp > 1 else 0.0) + tied

    # data parallel / ZeRO over the dp x cp ranks `tp` apart (cost.zero_comm_bytes' collectives)
    dp_total = dp_exposed = 0.0
    n_dp = st.dp * st.cp
    if n_dp > 1:
        psi = params_per_rank(shape, st.tp, st.pp)
        G, P, span = psi * prec.grad, psi * prec.param, _span(n_dp, st.tp, dpn)

        def timed(kind: str, nbytes: float, k: int) -> float:
            return k * best_time(kind, nbytes / k, n_dp, cluster, span, calibration)

        window = t_b  # the backward that reduces
        k_g, k_p = max(1, math.ceil(G / st.bucket_bytes)), max(1, math.ceil(P / st.bucket_bytes))
        if st.pp > 1:  # the pipeline's data parallelism: one all-reduce after the schedule (pipeline_run.py)
            dp_total = dp_exposed = timed("all_reduce", G, 1)
        elif st.zero == 0:
            dp_total = timed("all_reduce", G, k_g)
            dp_exposed = _overlapped(dp_total, k_g, window)
        elif st.zero in (1, 2):  # ZeRO-1: the last micro-batch's backward reduces; ZeRO-2: every one
            times, rs, ag = (1 if st.zero == 1 else m), timed("reduce_scatter", G, k_g), timed("all_gather", P, k_p)
            dp_total = times * rs + ag  # the gather: launched at step(), waited for by the next forward
            dp_exposed = times * _overlapped(rs, k_g, window) + _overlapped(ag, k_p, t_f)
        else:  # ZeRO-3: a layer's gather prefetched under the previous layer, forward and backward
            units = math.ceil(shape.layers / st.pp)
            ag, rs = timed("all_gather", P, units), timed("reduce_scatter", G, units)
            dp_total = m * (2 * ag + rs)
            dp_exposed = m * (_overlapped(ag, units, t_f) + _overlapped(ag + rs, units, t_b))

    ideal = m * (t_f + t_b)
    step = ideal + bubble + p2p + tied + dp_exposed
    tp_time = m * t_tp * (1.5 if st.activation_checkpointing else 1.0)  # issued; m·hidden of it overlaps
    tokens = st.global_batch * T
    mem = memory_per_device(model_cfg, st)
    exposed = {"tensor_parallel": tp_time - m * hidden, "pipeline": p2p + tied, "data_parallel": dp_exposed}
    issued = {"tensor_parallel": tp_time, "pipeline": p2p_issued, "data_parallel": dp_total}
    if st.cp > 1:
        exposed["context_parallel"] = m * (cpt.forward_exposed + cpt.backward_exposed)
        issued["context_parallel"] = m * cpt.issued
    return Prediction(
        world=st.world, cluster=cluster.name, strategy=st, step_time=step, compute=m * (fwd + bwd),
        comm_exposed=exposed, comm_total=issued,
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
        from ltk.models.gpt import GPTConfig

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
    from ltk.parallel.cluster import dgx_a100

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
