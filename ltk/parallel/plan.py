"""`ltk plan`: what a run would cost per rank before it is launched — the formulas of
ltk/parallel/cost.py applied to one preset, world size and strategy.

    ltk plan --preset gpt2-124m --world 8 --strategy zero3
    ltk plan --preset llama-8b --world 64 --strategy zero1 --tp 8 --json
    ltk plan --preset llama-8b --world 8 --strategy fsdp2 --method qlora    # fine-tuning: plan_finetune.py

Parameters per rank. The ranks form a pp x dp x tp mesh. Tensor parallelism splits every
block's matrices (and the biases of column-parallel layers) by tp and keeps norms and
row-parallel biases whole (Shoeybi et al. 2019 §3); the vocabulary (embedding, head) is split by
tp. Pipeline parallelism gives each stage ceil(L/pp) blocks; the first stage holds the input
embeddings, the last the final norm and the head (a tied head is a second copy there when
pp > 1, kept in sync by an all-reduce of its gradient). The plan reports the largest rank.
ZeRO then shards that rank's parameters over dp (cost.model_state_bytes).

Activations: Korthikanti et al.'s per-layer formula (cost.activation_bytes_per_layer) for the
micro-batch of batch/dp sequences, scaled from its 16-bit accounting to the compute dtype,
times the layers on a stage and the micro-batches in flight (1 without a pipeline; pp under
1F1B, m under GPipe — Narayanan et al. 2021 §2.2), plus the fp32 logits of the last stage.
Attention is taken to be FlashAttention (our kernels, SDPA): the s² scores are not stored
(`flash=False` puts Korthikanti's 5·a·s/h term back).

Gathered (ZeRO-3 only): what a rank holds whole besides its shards, as ltk/parallel/zero3.py
runs it (`gathered_bytes`). The root unit — embeddings, final norm, head — is gathered for the
whole forward and backward; one block computes while the next is prefetched; at the end of the
backward the root's full gradient and its flat copy for the reduce-scatter coexist (as do a
tied table's two dense gradients, head and embedding, while they are summed), and two blocks'
flat gradients are in flight:

    gathered = p·(root + 2·block) + g·(2·root + 2·block)        p, g: bytes per parameter, gradient

For gpt2-350m on 4 ranks in fp32 this is 0.83 GB against 1.42 GB of sharded states: at a small
world size a ZeRO-3 rank's peak is dominated by the units it gathers, not by its shards.

fsdp2 (PyTorch's fully_shard, ltk/parallel/fsdp2.py) shards the same states as ZeRO-3 (the same
params/grads/optimizer bytes; its collectives are its own, below) and gathers by its own rules
(`fsdp2_gathered_bytes`):
the root (embeddings, final norm, head) stays gathered from its forward to its backward
(reshard_after_forward false on the root, as torchtitan), the computing block and the one
prefetched, plus the flat all-gather buffer of the block in flight, which FSDP2 copies out into the
parameters; gradients: the root's whole, the block computing its gradient and the flat copy of the
one being reduce-scattered:

    gathered(fsdp2) = p·(root + 3·block) + g·(root + 2·block)

With --reshard-after-forward false (`--parallel.reshard_after_forward false`) every block stays
gathered from its forward to its backward: p·Ψ in place of p·(root + 3·block), one all-gather a
block per micro-batch instead of two. With gradient accumulation (m > 1) FSDP2 runs the micro-batches
before the last without gradient sync (`set_requires_gradient_sync(False)`), so every gradient stays
whole, in the reduce dtype, until the step's one reduce-scatter: g_r·Ψ + g·block in place of
g·(root + 2·block) — the bytes ZeRO-3 would reduce-scatter m - 1 more times, held instead.
Its collectives (cost.fsdp2_comm_bytes): all-gather m·p·(root + 2·blocks), reduce-scatter g_r·Ψ once,
counted equal to what `ltk train --parallel fsdp2` issues (ltk/parallel/comm_meter.py).

Measured (`ltk bench parallel-memory --strategy fsdp2`, gpt2-350m, 4 CPU ranks, fp32): the
training peak is 1.00x this plan (2.17 GiB per rank; our zero3 at the same flags 1.02x of its
2.32 GiB), once RSS counts live tensors: with glibc's default dynamic mmap threshold the freed
per-parameter buffers FSDP2 allocates each step stay in malloc's arenas and the RSS peak was
1.45x (ltk/bench/parallel_memory.py, "The allocator").

fsdp2 with pp > 1 (torch.distributed.pipelining over FSDP2 stages, ltk/parallel/torch_pp_fsdp.py):
the schedule turns FSDP2's resharding and gradient sync off for every micro-batch but the last
(torch's stage.py, `backward_maybe_with_nosync`), so by the last backward the stage holds all its
parameters gathered and its gradients whole until the step's reduce-scatter (`fsdp2_pp_gathered_bytes`):

    gathered(fsdp2, pp > 1) = (p + g_r)·Ψ_stage     Ψ_stage: the largest stage's parameters,
                                                    g_r: bytes of a gradient in the reduce dtype

— the sharding saves memory between steps (the 1/dp shards, AdamW's moments), not at the step's
peak (read from torch's code). Its collectives, counted (ltk/parallel/comm_meter.py): resharding
after forward stays on, so each block is gathered in every forward and once more in the first
backward, the stage's root once: all-gather p·(root_stage + (m + 1)·blocks_stage); one reduce-scatter
g_r·Ψ_stage a step (without resharding after forward, every unit is gathered once a step); the
tied table's gradient summed as dp shards, V·h·g/dp (cost.fsdp2_pp_comm_bytes).

DeepSpeed's stages (ltk/parallel/deepspeed_engine.py) shard what ours shard, with one difference
the plan adds: DeepSpeed's optimizer always works on a flat fp32 *copy* of its partition
(`single_partition_of_fp32_groups`, stage 3's `fp32_partitioned_groups_flat`), even when the
model itself is fp32, where ours updates the shard in place — 4Ψ/N more optimizer bytes in fp32
runs (under bf16 both hold that fp32 master, counted in K = 12). Its communication buckets
(reduce_bucket_size, allgather_bucket_size, stage 3's prefetch and live-parameter limits) are
left out: they are capped by its config, not by the model.

torch-tp (DTensor TP over every rank, ltk/parallel/torch_tp.py) holds what our tensor parallelism
holds (the same split, no data parallelism: dp must be 1; with dp use fsdp2 --tp).

Precision: fp32, or bf16/fp16 mixed precision as every engine runs it (ltk/parallel/mixed.py,
zero.py): parameters and gradients in 16 bits, collectives on them too, an fp32 master in the
optimizer's K = 12; `reduce_dtype` fp32 reduces gradients in fp32 (4 bytes per element on the
data-parallel collectives; the TP and PP collectives carry activations, in the compute dtype).

Communication: the data-parallel collectives of the ZeRO stage (cost.zero_comm_bytes), and
with tp > 1 the tensor-parallel ones of every micro-batch (cost.tp_comm_bytes), with pp > 1 the
activations and gradients a stage boundary carries (cost.pp_comm_bytes).

Context parallelism (`cp`, `cp_impl` ring | ulysses; ltk/parallel/cost_cp.py has the formulas): the
mesh becomes pp x dp x cp x tp (world = pp·dp·cp·tp, tp innermost). Each sequence is split over
its cp ranks: T is padded to T' (a multiple of 2·cp for the ring's zig-zag split, of cp for
Ulysses; the padded rows are counted everywhere, as the ranks hold and compute them), a rank's
layers, logits, TP and PP messages hold T'/cp tokens, and the activations add the CP buffers
alive at the peak (the ring's K/V and dK/dV in flight, Ulysses' head-sharded copies). Ulysses
needs heads % (cp·tp) == 0. The parameters are replicated over cp, so the gradient reduction
runs over the dp·cp ranks and ZeRO / FSDP shard the model states over them — torchtitan's
convention (torchtitan/distributed/parallel_dims.py: FSDP over the flattened `dp_shard_cp`
mesh, the loss all-reduced over `dp_cp`). The ring's sends (K/V forward, K/V and dK/dV backward)
or Ulysses' all-to-alls join the communication as "context_parallel".

With a cluster (`--cluster dgx-a100`, a preset of ltk/parallel/cluster.py or a JSON description)
the plan adds ltk/parallel/simulator.py's prediction of one step on it: step time and its split
(compute, exposed communication by kind, pipeline bubble), MFU, tokens/s and memory per device.

    ltk plan --preset llama-8b --world 64 --strategy zero3 --cluster dgx-h100 --seq-len 4096
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ltk.parallel import cost, cost_cp

# engine -> the ZeRO stage whose states it shards (fsdp2: ZeRO-3's; torch-tp: none, tp over every rank;
# DeepSpeed's stages: the same partitions as ours)
ENGINES = {"none": None, "ddp": 0, "naive-ddp": 0, "torch-ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": 3,
           "torch-tp": 0, "deepspeed-zero1": 1, "deepspeed-zero2": 2, "deepspeed-zero3": 3}


@dataclass(frozen=True)
class Shape:
    """What the formulas need of a decoder-only model."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    positions: int  # learned position rows (0 for RoPE)
    block_matrix: int  # split by tp
    block_split_vector: int  # column-parallel biases: split by tp
    block_whole_vector: int  # norms, row-parallel biases: replicated
    final_norm: int
    tied: bool


def model_shape(family: str, cfg) -> Shape:
    if family == "gpt":
        d, b = cfg.n_embd, 1 if cfg.bias else 0
        return Shape(cfg.n_layer, d, cfg.n_head, cfg.vocab_size, cfg.block_size, 12 * d * d, b * 7 * d,
                     (2 + 2 * b) * d + b * 2 * d, (1 + b) * d, True)
    if family == "llama":
        d, hd = cfg.n_embd, cfg.head_dim
        attn = d * hd * (2 * cfg.n_head + 2 * cfg.n_kv_head)
        return Shape(cfg.n_layer, d, cfg.n_head, cfg.vocab_size, 0, attn + 3 * d * cfg.intermediate_size, 0,
                     2 * d, d, cfg.tie_embeddings)
    raise ValueError(f"ltk plan covers the decoder-only families gpt and llama, not {family!r}")


def params_per_rank(s: Shape, tp: int, pp: int) -> int:
    """Parameters on the largest rank of a tp x pp split (module docstring)."""
    per_block = s.block_matrix // tp + s.block_split_vector // tp + s.block_whole_vector
    blocks = math.ceil(s.layers / pp) * per_block
    embed = s.vocab * s.hidden // tp + s.positions * s.hidden
    head = s.final_norm + (0 if s.tied and pp == 1 else s.vocab * s.hidden // tp)
    if pp == 1:
        return blocks + embed + head
    return blocks + max(embed, head)


def units(s: Shape, tp: int) -> tuple[int, int]:
    """(root, block): the parameters of ZeRO-3's / FSDP2's root unit (embeddings, positions, final
    norm, an untied head) and of one block, on a rank of a tp split."""
    block = s.block_matrix // tp + s.block_split_vector // tp + s.block_whole_vector
    table = s.vocab * s.hidden // tp
    return table + s.positions * s.hidden + s.final_norm + (0 if s.tied else table), block


def gathered_bytes(s: Shape, tp: int, prec: cost.Precision) -> int:
    """ZeRO-3's working set of whole parameters and gradients (module docstring)."""
    root, block = units(s, tp)
    return prec.param * (root + 2 * block) + prec.grad * (2 * root + 2 * block)


def fsdp2_gathered_bytes(s: Shape, tp: int, prec: cost.Precision, micro_batches: int = 1,
                         reshard_after_forward: bool = True) -> int:
    """FSDP2's working set of whole parameters and gradients (module docstring): without resharding
    after forward every block stays gathered until its backward; while accumulating (m > 1) every
    gradient stays whole, in the reduce dtype, until the step's one reduce-scatter."""
    root, block = units(s, tp)
    params = prec.param * (root + 3 * block if reshard_after_forward else params_per_rank(s, tp, 1))
    grads = prec.grad * (root + 2 * block) if micro_batches == 1 else \
        prec.comm_grad * params_per_rank(s, tp, 1) + prec.grad * block
    return params + grads


def fsdp2_pp_gathered_bytes(s: Shape, tp: int, pp: int, prec: cost.Precision) -> int:
    """FSDP2 stages under a pipeline schedule: the largest stage gathered, its gradients whole (docstring),
    accumulated in the reduce dtype (FSDP2's `to_accumulated_grad_if_needed`)."""
    return (prec.param + prec.comm_grad) * params_per_rank(s, tp, pp)


def check_plan(world: int, tp: int, pp: int, batch: int, seq_len: int | None, micro_batches: int, virtual: int,
               efficiency: float | None, cp: int = 1) -> None:
    """Refuse a mesh or batch that no run could have, naming the `ltk plan` flag and its range
    (a world of 0 would divide by zero, a negative one would print negative memory)."""
    for flag, value in (("--world", world), ("--tp", tp), ("--pp", pp), ("--cp", cp), ("--batch-size", batch),
                        ("--seq-len", seq_len), ("--micro-batches", micro_batches), ("--virtual-stages", virtual)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if efficiency is not None and not 0 < efficiency <= 1:  # also refuses NaN
        raise ValueError(f"--efficiency {efficiency}: must be in (0, 1], a fraction of the peak FLOP/s")
    if world % (tp * pp * cp):
        raise ValueError(f"--world {world} is not divisible by --tp x --pp = {tp * pp}" if cp == 1 else
                         f"--world {world} is not divisible by --tp x --pp x --cp = {tp * pp * cp}")
    dp = world // (tp * pp * cp)
    if batch % dp:
        raise ValueError(f"the global batch of {batch} sequences (--batch-size) does not split over {dp} "
                         "data-parallel ranks")
    if pp > 1 and (batch // dp) % micro_batches:
        raise ValueError(f"the {batch // dp} sequences per data-parallel rank do not split into "
                         f"--micro-batches {micro_batches}")


def plan(family: str, cfg, *, world: int, strategy: str = "ddp", tp: int = 1, pp: int = 1, batch: int = 8,
         seq_len: int | None = None, micro_batches: int = 1, dtype: str = "fp32", schedule: str = "1f1b",
         virtual: int = 1, sequence_parallel: bool = False, recompute: bool = False, flash: bool = True,
         cluster=None, efficiency: float | None = None, reduce_dtype: str | None = None, cp: int = 1,
         cp_impl: str = "ring", method: str | None = None, lora_r: int = 8, lora_targets: str = "",
         compute_dtype: str = "fp32", reshard_after_forward: bool = True) -> dict[str, Any]:
    """Bytes per rank and per step for one configuration; keys as `ltk plan --json` prints.
    With `cluster` (a preset name, a JSON path or a parallel.cluster.Cluster) also the key
    "prediction" (predict below); `efficiency` overrides the simulator's compute efficiency.
    With `method` (full, lora, qlora) the plan of fine-tuning: ltk/parallel/plan_finetune.py."""
    if method is not None:
        from ltk.parallel.plan_finetune import plan_finetune

        ignored = [f for f, v in (("--tp", tp > 1), ("--pp", pp > 1), ("--cp", cp > 1), ("--cluster", cluster),
                                  ("--sequence-parallel", sequence_parallel), ("--reduce-dtype", reduce_dtype),
                                  ("--reshard-after-forward false", not reshard_after_forward)) if v]
        if ignored:
            raise ValueError(f"the fine-tuning plan (--method {method}) covers data parallelism (none, ddp, zero3, "
                             f"fsdp2) over the whole world; drop {', '.join(ignored)}")
        return plan_finetune(family, cfg, method=method, world=world, strategy=strategy, batch=batch,
                             seq_len=seq_len, micro_batches=micro_batches, dtype=dtype, r=lora_r,
                             targets=lora_targets, compute_dtype=compute_dtype, recompute=recompute, flash=flash)
    if strategy not in ENGINES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(ENGINES)} (plus --tp / --pp)")
    check_plan(world, tp, pp, batch, seq_len, micro_batches, virtual, efficiency, cp)
    dp = world // (tp * pp * cp)
    if strategy == "torch-tp" and (dp > 1 or pp > 1):
        raise ValueError(f"torch-tp runs tensor parallelism over every rank (--tp {world}); with {dp} data-parallel "
                         f"ranks plan --strategy fsdp2 --tp {tp}")
    if not reshard_after_forward and strategy != "fsdp2":
        raise ValueError(f"--reshard-after-forward false is FSDP2's setting; --strategy {strategy} has none")
    if strategy == "fsdp2" and tp > 1 and pp > 1:
        raise ValueError("fsdp2 with both --tp and --pp (a 3-D mesh) is not wired: plan --strategy fsdp2 with --tp N "
                         "(FSDP2 x TP) or with --pp N (PP x FSDP2)")
    stage = ENGINES[strategy] or 0
    s = model_shape(family, cfg)
    T_seq = seq_len or getattr(cfg, "block_size", 1024)
    prec = cost.Precision.of(dtype, reduce_dtype)
    psi = params_per_rank(s, tp, pp)
    states = cost.model_state_bytes(psi, dp * cp, stage, prec)  # ZeRO / FSDP shard over dp x cp

    b = batch // dp // (micro_batches if pp > 1 else 1)  # sequences per micro-batch on a rank
    cpx = context_parallel(family, cfg, cp=cp, impl=cp_impl, seq_len=T_seq, batch=b, tp=tp, layers=math.ceil(
        s.layers / pp), micro_batches=micro_batches, dtype_bytes=prec.param, recompute=recompute)
    T = cpx["tokens_per_rank"]  # T'/cp: the tokens of a sequence one rank holds (T without CP)
    scale = 4 / 2 if dtype == "fp32" else 1.0  # Korthikanti counts 2-byte activations
    layer = cost.activation_bytes_per_layer(T, b, s.hidden, s.heads, tp, sequence_parallel, recompute, flash) * scale
    in_flight = 1 if pp == 1 else (micro_batches if schedule == "gpipe" else min(pp, micro_batches))
    logits = b * T * s.vocab // tp * 4  # the fp32 logits the loss reads (last stage)
    activations = int(layer * math.ceil(s.layers / pp) * in_flight + logits) + cpx["buffers"]

    comm = {}
    if dp * cp > 1:
        if strategy == "fsdp2" and pp > 1:  # the largest stage: its blocks, the rest its root
            comm = cost.fsdp2_pp_comm_bytes(psi, psi - math.ceil(s.layers / pp) * units(s, tp)[1], micro_batches,
                                            prec, reshard_after_forward)
        elif strategy == "fsdp2":
            comm = cost.fsdp2_comm_bytes(psi, units(s, tp)[0], micro_batches, prec, reshard_after_forward)
        else:
            comm = cost.zero_comm_bytes(psi, stage, micro_batches, prec)
    m = micro_batches
    breakdown = {"data_parallel": comm}
    if tp > 1:
        per_micro = cost.tp_comm_bytes(b, T, s.hidden, math.ceil(s.layers / pp), tp,
                                       sequence_parallel=sequence_parallel, dtype_bytes=prec.param, arch=family,
                                       bias=s.block_split_vector > 0, positions=s.positions)
        breakdown["tensor_parallel"] = {op: m * v for op, v in per_micro.items()}
    if pp > 1:
        pp_bytes = cost.pp_comm_bytes(pp, m, b, T, s.hidden, virtual if schedule == "interleaved" else 1,
                                      dtype_bytes=prec.param, vocab=s.vocab if s.tied else None)
        sends, tied = pp_bytes["per_rank_send"], pp_bytes["per_rank_all_reduce"]
        if strategy == "fsdp2":  # the tied table's gradient is summed as dp shards (torch_pp_fsdp.py)
            tied = [math.ceil(b / (dp * cp)) for b in tied]
        r = max(range(pp), key=lambda i: sends[i] + tied[i])  # the busiest stage: boundaries + tied weight
        breakdown["pipeline"] = {"send": sends[r], **({"all_reduce": tied[r]} if tied[r] else {})}
    if cp > 1:
        breakdown["context_parallel"] = cpx["comm"]
    gathered = 0
    if stage == 3 and dp * cp > 1:
        if strategy == "fsdp2" and pp > 1:
            gathered = fsdp2_pp_gathered_bytes(s, tp, pp, prec)
        else:
            gathered = fsdp2_gathered_bytes(s, tp, prec, micro_batches, reshard_after_forward) \
                if strategy == "fsdp2" else gathered_bytes(s, tp, prec)
    if strategy.startswith("deepspeed-") and dtype == "fp32":  # its fp32 copy of the partition (docstring)
        states = {**states, "optimizer": states["optimizer"] + 4 * math.ceil(psi / (dp * cp))}
    total = states["params"] + states["grads"] + states["optimizer"] + activations + gathered
    out = {
        "family": family, "world": world, "mesh": {"dp": dp, "tp": tp, "pp": pp, **({"cp": cp} if cp > 1 else {})},
        "strategy": strategy,
        "zero_stage": stage, "dtype": dtype, "reduce_dtype": reduce_dtype or dtype, "num_params_per_rank": psi,
        "params": states["params"], "grads": states["grads"], "optimizer": states["optimizer"],
        "activations": activations, "gathered": gathered, "total": total,
        "comm_bytes_per_step": sum(sum(d.values()) for d in breakdown.values()), "comm": breakdown,
        "comm_wire_bytes_per_step": cost.wire_bytes(comm, dp * cp) + sum(
            cost.wire_bytes(d, n) for d, n in ((breakdown.get("tensor_parallel", {}), tp),
                                               (breakdown.get("pipeline", {}), 2),
                                               (breakdown.get("context_parallel", {}), cp))),
    }
    if cp > 1:
        out["context_parallel"] = cpx
    if pp > 1:
        out["bubble_fraction"] = cost.bubble_fraction(pp, micro_batches, virtual if schedule == "interleaved" else 1)
    if cluster is not None:
        out["prediction"] = predict(family, cfg, cluster, world=world, zero=stage, tp=tp, pp=pp, batch=batch,
                                    seq_len=T_seq, micro_batches=micro_batches, dtype=dtype, schedule=schedule,
                                    virtual=virtual, sequence_parallel=sequence_parallel, recompute=recompute,
                                    flash=flash, efficiency=efficiency, cp=cp, cp_impl=cp_impl)
    return out


def predict(family: str, cfg, cluster, *, world: int, zero: int, tp: int, pp: int, batch: int, seq_len: int,
            micro_batches: int, dtype: str, schedule: str, virtual: int, sequence_parallel: bool, recompute: bool,
            flash: bool, efficiency: float | None = None, cp: int = 1, cp_impl: str = "ring") -> dict[str, Any]:
    """ltk/parallel/simulator.py's prediction of one step of this plan on `cluster` (a preset is
    given as many nodes as `world` needs), as the JSON-ready dict under "prediction"."""
    from ltk.parallel.cluster import load_cluster
    from ltk.parallel.simulator import Calibration, Strategy, simulate

    c = load_cluster(cluster, world)
    st = Strategy(dp=world // (tp * pp * cp), cp=cp, cp_impl=cp_impl, tp=tp, pp=pp, zero=zero,
                  micro_batches=micro_batches,
                  virtual_stages=virtual if schedule == "interleaved" else 1, schedule=schedule,
                  activation_checkpointing=recompute, sequence_parallel=sequence_parallel, global_batch=batch,
                  seq_len=seq_len, dtype=dtype, flash=flash)
    p = simulate(cfg, c, st, None if efficiency is None else Calibration(efficiency=efficiency))
    return {"cluster": c.to_dict(), "step_time_s": p.step_time, "compute_s": p.compute,
            "exposed_comm_s": p.comm_exposed, "issued_comm_s": p.comm_total, "bubble_s": p.bubble,
            "bubble_fraction": p.bubble_fraction, "bubble_source": p.bubble_source, "mfu": p.mfu, "hfu": p.hfu,
            "tokens_per_s": p.tokens_per_s, "memory_per_device": p.memory, "fits": p.fits,
            "efficiency": p.efficiency, "efficiency_source": p.efficiency_source}


def format_plan(p: dict[str, Any]) -> str:
    gib = 2**30
    mesh = p["mesh"]
    cp_axis = f" x cp {mesh['cp']}" if mesh.get("cp", 1) > 1 else ""
    lines = [f"{p['family']} on {p['world']} ranks (dp {mesh['dp']}{cp_axis} x tp {mesh['tp']} x pp {mesh['pp']}), "
             f"{p['strategy']} (ZeRO stage {p['zero_stage']}), {p['dtype']}",
             f"  parameters on the largest rank: {p['num_params_per_rank']:,}"]
    for k in ("params", "grads", "optimizer", "activations", "gathered", "total"):
        lines.append(f"  {k:12s} {p[k] / gib:10.3f} GiB")
    lines.append(f"  communicated per step: {p['comm_bytes_per_step'] / gib:.3f} GiB payload, "
                 f"{p['comm_wire_bytes_per_step'] / gib:.3f} GiB sent per rank (ring)")
    if "bubble_fraction" in p:
        lines.append(f"  pipeline bubble: {p['bubble_fraction']:.1%} of the ideal step time")
    if "context_parallel" in p:
        lines.append(format_context_parallel(p["context_parallel"]))
    if "prediction" in p:
        lines += format_prediction(p["prediction"])
    return "\n".join(lines)


def format_prediction(q: dict[str, Any]) -> list[str]:
    c, gib = q["cluster"], 2**30
    comm = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in q["exposed_comm_s"].items() if v > 0) or "none"
    mem = q["memory_per_device"]
    return [f"  predicted on {c['name']} ({c['nodes']} x {c['devices_per_node']} devices, "
            f"{c['peak_flops'] / 1e12:.0f} TFLOP/s peak, compute efficiency {q['efficiency']:.2f}: "
            f"{q['efficiency_source']}):",
            f"    step time     {q['step_time_s']:.4g} s = compute {q['compute_s']:.4g} + exposed communication "
            f"{sum(q['exposed_comm_s'].values()):.4g} ({comm}) + bubble {q['bubble_s']:.4g}",
            f"    MFU           {q['mfu']:.1%}"
            + (f" (with recomputation {q['hfu']:.1%})" if q["hfu"] != q["mfu"] else ""),
            f"    tokens/s      {q['tokens_per_s']:,.0f}",
            f"    memory        {mem['total'] / gib:.2f} GiB per device of {c['memory_bytes'] / gib:.0f} GiB "
            f"({'fits' if q['fits'] else 'does NOT fit'})"]


# == context parallelism (ltk/parallel/cost_cp.py; the module docstring's paragraph) ================
def attention_dims(family: str, cfg) -> tuple[int, int, int]:
    """(H, H_kv, D): query heads, key/value heads, head dim (GPT: H_kv = H)."""
    heads = cfg.n_head
    return heads, getattr(cfg, "n_kv_head", heads), cfg.n_embd // heads


def context_parallel(family: str, cfg, *, cp: int, impl: str, seq_len: int, batch: int, tp: int, layers: int,
                     micro_batches: int, dtype_bytes: int, recompute: bool, dkv_bytes: int | None = None) -> dict:
    """What splitting each sequence over `cp` ranks costs one rank: the padded length, the tokens
    it holds, the buffers at the peak and the payload by op per step (`micro_batches` micro-batches
    of `batch` sequences over `layers` layers). cp = 1: no padding, no buffers, no bytes."""
    heads, kv_heads, head_dim = attention_dims(family, cfg)
    cost_cp.check_cp(cp, impl, heads, kv_heads, tp)
    padded = cost_cp.padded_seq_len(seq_len, cp, impl)
    per_micro = cost_cp.comm_bytes(padded, batch, heads, kv_heads, head_dim, layers, cp, impl, tp, dtype_bytes,
                                   dkv_bytes, recompute)
    return {"impl": impl, "cp": cp, "split": "zigzag" if impl == "ring" else "heads", "seq_len": seq_len,
            "padded_seq_len": padded, "tokens_per_rank": padded // cp,
            "buffers": cost_cp.peak_buffer_bytes(padded, batch, heads, kv_heads, head_dim, cp, impl, tp, dtype_bytes,
                                                 dkv_bytes),
            "comm": {op: micro_batches * n for op, n in per_micro.items()}}


def format_context_parallel(c: dict) -> str:
    mib = 2**20
    how = "ring attention, zig-zag split" if c["impl"] == "ring" else "Ulysses all-to-all, heads split"
    pad = f" (padded to {c['padded_seq_len']:,})" if c["padded_seq_len"] != c["seq_len"] else ""
    moved = ", ".join(f"{op.replace('_', '-')} {n / mib:,.1f} MiB" for op, n in c["comm"].items())
    return (f"  context parallel: cp {c['cp']} ({how}), {c['seq_len']:,} tokens{pad} -> {c['tokens_per_rank']:,} "
            f"per rank; buffers at the peak {c['buffers'] / mib:,.1f} MiB; per step {moved}")
