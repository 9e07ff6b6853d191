"""The plan of a fine-tuning run: memory per rank and bytes per step of full fine-tuning, LoRA
and QLoRA under ddp, zero3 and fsdp2 (`ltk plan --method lora|qlora|full`).

    ltk plan --preset llama-8b --world 8 --strategy fsdp2 --method qlora --lora-r 16 --seq-len 2048

The model's structure (which Linears LoRA adapts, which QLoRA quantizes, which weights are tied,
the sharding units) comes from the model itself, built on the meta device (no memory) with the
same function as the run (ltk/training/adapters.py apply_adapter: LoRA's A and B, QLoRA's NF4
storage, shapes only; the units of ltk/parallel/zero3.py: each transformer block, and the root =
everything else; ltk/parallel/finetune_layout.py); the bytes come from the rules below. The keys
of `components` are those of ltk/models/qlora.py `memory_breakdown`, which measures a run: the
two compare key by key.

Notation: Ψ every weight, ψ the trainable ones, Ψ_f the frozen full-precision ones (embeddings,
norms, head, frozen biases; the adapted layers' W under LoRA), N the data-parallel ranks, m the
micro-batches of a step, t bytes of a trainable element (its dtype: the base's 4 in fp32; A and B
of QLoRA in the compute dtype c; 2 under --dtype bf16), b_f bytes of a frozen element (4: the base
as loaded, under bf16 too, except zero3's, which casts it to the compute dtype). Adam keeps 2
moments in the parameter's dtype (K = 2t), or with bf16 mixed precision an fp32 master and fp32
moments (K = 12); each parameter tensor the optimizer steps also has one fp32 `step` scalar
(4 bytes; s such tensors).

What trains (Hu et al. 2021 §4.1; Dettmers et al. 2023 §3), per adapted Linear W (out x in):

    full    ψ = Ψ, nothing frozen
    lora    W frozen; A (r x in) and B (out x r) train:   ψ = Σ r·(in + out)
    qlora   as lora; every Linear of the blocks (quantize_model's default) stored in NF4 with
            double quantization, exactly as NF4LinearDQ allocates it for n = in·out weights,
            blocksize B1 = 64, second-level blocks B2 = 256:
                packed = ⌈n/2⌉                                 two 4-bit codes a byte
                stats  = ⌈n/B1⌉ + 4·⌈⌈n/B1⌉/B2⌉ + 4            absmax codes, fp32 scales, offset
            ≈ n · nf4_bits_per_param()/8 = n · 4.127/8; its bias (if any) frozen in c

Per rank, ddp (and one process): everything replicated:

    weights    b_f·Ψ_f (+ NF4 packed + stats) + t·ψ
    gradients  t·ψ                            (the adapters' only: a frozen W has none)
    optimizer  K·ψ + 4s

zero3 / fsdp2: every unit's tensors are sharded over N, so a rank holds ≈ 1/N of every line
above; exactly (ltk/parallel/finetune_layout.py, which derives it from the engines' layouts):

    zero3   a unit's trainable tensors one flat vector, padded: ⌈ψ_u/N⌉ elements a rank of the
            adapters, their gradients and moments (+ the fp32 master under bf16); its frozen
            tensors one byte vector (every tensor 16-byte aligned, the frozen floats in the compute
            dtype: b_f = 2 under bf16), ⌈bytes/N⌉ a rank; one `step` per (unit, AdamW group) piece
            the rank steps
    fsdp2   every parameter cut along dim 0 into ⌈d_0/N⌉-row chunks (the last padded), QLoRA's
            integer NF4 buffers as frozen parameters, its fp32 scales and offset replicated
            (~4 bytes per 16,384 weights); parameters, gradient shards and moments stay in the
            dtype built in (fp32: under bf16 FSDP2 casts the gathered copies only, K = 8, no master);
            one `step` per trainable tensor

The padding is all they add to Ψ/N (zero3: < 16 bytes a frozen tensor and < N bytes or elements a
unit; fsdp2: < one row a tensor). `components` gives rank `rank`'s bytes (default 0, which holds
the most): under zero3 every rank holds the same total, but where its share of a unit's byte
vector falls — frozen full precision, NF4 codes or statistics — depends on the rank.

Besides its shards a rank gathers whole units, as ltk/parallel/plan.py counts them for
pre-training, with P_u the bytes of unit u's weights as its all-gather moves them (frozen +
NF4 + adapters, padded) and gradients only for the trainable part:

    gathered(zero3) = P_root + 2·P_block + t·(2·ψ_root + 2·ψ_block)
    gathered(fsdp2) = P_root + 3·P_block + t·(ψ_root + 2·ψ_block)     m > 1: t·(Σ_u ψ_u + ψ_block)

(FSDP2 accumulates the micro-batches before the last without gradient sync: the trainable
gradients stay whole until the step's one reduce-scatter)

(for full fine-tuning P_u = t·Ψ_u, ψ_u = Ψ_u: plan.py's gathered_bytes / fsdp2_gathered_bytes).
A dequantized NF4 tile lives only inside the matmul (ltk/kernels/nf4.py): not counted.

Activations: plan.py's (Korthikanti et al. 2022 with FlashAttention, scaled to the compute dtype,
plus the fp32 logits) for the micro-batch b = batch/N, and LoRA's own: each adapted Linear keeps
its r-wide intermediate u = x·Aᵀ for B's gradient, r·b·s·t bytes (the frozen W no longer needs
its input, A does: the same tensor). That is r / (34·h/n_adapted) of a layer's activations —
under 1% at r = 8, h = 128 with 4 adapted Linears — but it is counted.

Communication per step (payload bytes, padding included; measured equal by the engines' counters,
ltk/parallel/dist.py STATS, for zero3 and by counting torch's collectives for fsdp2):

    ddp     all_reduce      t·ψ                       the adapters' gradients only (no_sync before)
    zero3   all_gather      2·m·Σ_u P_u               every unit twice a micro-batch, the root too
            reduce_scatter  m·t·Σ_u N·⌈ψ_u/N⌉         every micro-batch (ZeRO-3 keeps no full gradient)
    fsdp2   all_gather      m·(P_root + 2·Σ_b P_b)    the root once a micro-batch (reshard_after_forward
                                                      false on the root), each block twice
            reduce_scatter  Σ_u N·Σ_p ⌈d_0/N⌉·(n_p/d_0)·t_r   once a step (no_sync while accumulating)

so a LoRA step under zero3 moves about 2·m·(weights) where ddp moves t·ψ: sharding the frozen
base buys memory with bandwidth; the frozen base travels as bytes (fsdp2 under bf16: its floats
in bf16). Bytes on the wire: cost.wire_bytes (ring).
"""
from __future__ import annotations

from typing import Any

from ltk.parallel import cost
from ltk.parallel.finetune_layout import gathered_unit_bytes, held, layout, reduced_unit_bytes

METHODS = ("full", "lora", "qlora")
STRATEGIES = {"none": 0, "ddp": 0, "naive-ddp": 0, "torch-ddp": 0, "zero3": 3, "fsdp2": 3}
COMPONENTS = ("base_nf4_packed", "base_nf4_stats", "base_full", "trainable", "gradients", "optimizer_states")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def nf4_bytes(n: int, blocksize: int = 64, blocksize2: int = 256) -> tuple[int, int]:
    """(packed, stats) bytes of one NF4LinearDQ of n weights (module docstring)."""
    blocks = -(-n // blocksize)
    return (n + 1) // 2, blocks + 4 * -(-blocks // blocksize2) + 4


def plan_finetune(family: str, cfg, *, method: str, world: int, strategy: str = "ddp", batch: int = 8,
                  seq_len: int | None = None, micro_batches: int = 1, dtype: str = "fp32", r: int = 8,
                  targets: str = "", compute_dtype: str = "fp32", recompute: bool = False,
                  flash: bool = True, rank: int = 0) -> dict[str, Any]:
    """Bytes per rank (`components` of rank `rank`, memory_breakdown's keys; and the totals plan.py
    prints) and bytes per step of one fine-tuning configuration (module docstring)."""
    from ltk.parallel.plan import model_shape

    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"a fine-tuning plan covers --strategy {', '.join(STRATEGIES)}; got {strategy!r}")
    for flag, value in (("--world", world), ("--batch-size", batch), ("--micro-batches", micro_batches),
                        ("--seq-len", seq_len), ("--lora-r", r)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if compute_dtype not in DTYPE_BYTES or dtype not in DTYPE_BYTES:
        raise ValueError(f"dtypes for a fine-tuning plan are fp32 or bf16, got {dtype!r} / {compute_dtype!r}")
    if strategy == "none" and world > 1:
        raise ValueError(f"--strategy none is one process; --world {world} needs ddp, zero3 or fsdp2")
    if batch % world:
        raise ValueError(f"the global batch of {batch} sequences (--batch-size) does not split over {world} ranks")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} ranks")
    units, model, num_params = layout(family, cfg, method, r, targets, compute_dtype)
    sharded = STRATEGIES[strategy] == 3
    n = world
    psi = sum(u.psi for u in units)
    t = 2 if dtype == "bf16" else next((x.elem for u in units for x in u.trainable), 4)
    comp = held(units, strategy if sharded else "ddp", n, rank, dtype)
    comp = {k: comp[k] for k in COMPONENTS}

    from ltk.models.lora import LoRALinear
    from ltk.models.qlora import NF4Linear
    from ltk.training.adapters import targets_of
    from ltk.training.config import AdapterConfig

    blocks = len(units) - 1
    adapted = sum(isinstance(m, LoRALinear) for m in model.modules())
    info = {"num_params": num_params,
            "trainable_params": psi, "quantized_params": sum(
                m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)),
            "adapted_layers": adapted, "adapted_per_block": adapted // max(blocks, 1),
            "trainable_bytes_per_element": t,
            "targets": [] if method == "full" else targets_of(AdapterConfig(targets=targets), family)}

    s = model_shape(family, cfg)
    T = seq_len or getattr(cfg, "block_size", 1024)
    b = batch // world
    scale = 4 / 2 if dtype == "fp32" else 1.0  # Korthikanti counts 2-byte activations
    layer = cost.activation_bytes_per_layer(T, b, s.hidden, s.heads, 1, False, recompute, flash) * scale
    lora = 0 if recompute or method == "full" else info["adapted_per_block"] * r * b * T * t
    activations = int((layer + lora) * s.layers + b * T * s.vocab * 4)

    gathered, comm = 0, {}
    if sharded and n > 1:
        p = [gathered_unit_bytes(u, strategy, n, dtype) for u in units]
        root, (p_block, block) = units[0], max(zip(p[1:], units[1:]), key=lambda x: x[0] + t * x[1].psi)
        if strategy == "fsdp2":
            gathered = p[0] + 3 * p_block + t * (root.psi + 2 * block.psi if micro_batches == 1 else
                                                 sum(u.psi for u in units) + block.psi)  # m > 1: grads whole
            gather = micro_batches * (p[0] + 2 * sum(p[1:]))  # the root stays gathered from forward to backward
            reduce = sum(reduced_unit_bytes(u, strategy, n, dtype) for u in units)  # once a step (no_sync)
        else:
            gathered = p[0] + 2 * p_block + t * (2 * root.psi + 2 * block.psi)
            gather = 2 * micro_batches * sum(p)
            reduce = micro_batches * sum(reduced_unit_bytes(u, strategy, n, dtype) for u in units)
        comm = {"all_gather": gather, "reduce_scatter": reduce}
    elif n > 1:
        comm = {"all_reduce": t * psi}
    weights = sum(comp[x] for x in ("base_nf4_packed", "base_nf4_stats", "base_full", "trainable"))
    total = weights + comp["gradients"] + comp["optimizer_states"] + activations + gathered
    return {"family": family, "method": method, "world": world, "strategy": strategy, "rank": rank,
            "zero_stage": STRATEGIES[strategy], "dtype": dtype, "compute_dtype": compute_dtype, "lora_r": r,
            **info, "components": comp, "params": weights, "grads": comp["gradients"],
            "optimizer": comp["optimizer_states"], "activations": activations, "gathered": gathered,
            "total": total, "comm": {"data_parallel": comm}, "comm_bytes_per_step": sum(comm.values()),
            "comm_wire_bytes_per_step": cost.wire_bytes(comm, n)}


def format_finetune_plan(p: dict[str, Any]) -> str:
    mib = 2**20
    what = {"full": "every weight trains", "lora": f"LoRA r={p['lora_r']} on {p['adapted_layers']} Linears",
            "qlora": f"QLoRA r={p['lora_r']} on {p['adapted_layers']} Linears, "
                     f"{p['quantized_params']:,} weights in NF4"}[p["method"]]
    # sharded: ranks hold the same totals (zero3) or rank 0 the most (fsdp2), cut differently by component
    which = f" (rank {p['rank']})" if p["zero_stage"] == 3 and p["world"] > 1 else ""
    lines = [f"{p['family']} fine-tuning ({what}) on {p['world']} ranks, {p['strategy']}, {p['dtype']}",
             f"  trainable parameters: {p['trainable_params']:,} of {p['num_params']:,} "
             f"({p['trainable_params'] / p['num_params']:.2%})", f"  per rank{which}:"]
    for k, v in p["components"].items():
        lines.append(f"    {k:18s} {v / mib:12.3f} MiB")
    for k in ("activations", "gathered", "total"):
        lines.append(f"    {k:18s} {p[k] / mib:12.3f} MiB")
    comm = p["comm"]["data_parallel"]
    ops = ", ".join(f"{op.replace('_', '-')} {b / mib:.3f} MiB" for op, b in comm.items()) or "none"
    lines.append(f"  communicated per step: {ops} ({p['comm_wire_bytes_per_step'] / mib:.3f} MiB sent per rank, ring)")
    return "\n".join(lines)
