"""The plan of a fine-tuning run: memory per rank and bytes per step of full fine-tuning, LoRA
and QLoRA under ddp, zero3 and fsdp2 (`ltk plan --method lora|qlora|full`).

    ltk plan --preset llama-8b --world 8 --strategy fsdp2 --method qlora --lora-r 16 --seq-len 2048

The model's structure (which Linears LoRA adapts, which QLoRA quantizes, which weights are tied,
the sharding units) comes from the model itself, built on the meta device (no memory) with the
same rules as the run (ltk/models/lora.py apply_lora, ltk/models/qlora.py quantize_model; the
units of ltk/parallel/zero3.py: each transformer block, and the root = everything else); the
bytes come from the formulas below. The keys of `components` are those of
ltk/models/qlora.py `memory_breakdown`, which measures a run: the two compare key by key.

Notation: Ψ every weight, ψ the trainable ones, Ψ_f the frozen full-precision ones (embeddings,
norms, head, frozen biases; the adapted layers' W under LoRA), N the data-parallel ranks, m the
micro-batches of a step, t bytes of a trainable element (its dtype: the base's 4 in fp32; A and B
of QLoRA in the compute dtype c; 2 under --dtype bf16), b_f bytes of a frozen element (4: the base
as loaded). Adam keeps 2 moments in the parameter's dtype (K = 2t), or with bf16 mixed precision
an fp32 master and fp32 moments (K = 12); each parameter tensor the optimizer steps also has one
fp32 `step` scalar (4 bytes; s such tensors).

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

zero3 / fsdp2: every unit's components (frozen full, NF4 codes, NF4 stats, adapters, their
gradients and moments) are flat buffers sharded over N, the frozen base as bytes: a rank holds
⌈x_u/N⌉ of each (x_u bytes, or elements for the trainable part), so ≈ 1/N of every line above.
Besides its shards a rank gathers whole units, as ltk/parallel/plan.py counts them for
pre-training, with P_u the bytes of unit u's stored weights (frozen + NF4 + adapters) and
gradients only for the trainable part:

    gathered(zero3) = P_root + 2·P_block + t·(2·ψ_root + 2·ψ_block)
    gathered(fsdp2) = P_root + 3·P_block + t·(ψ_root + 2·ψ_block)

(for full fine-tuning P_u = t·Ψ_u, ψ_u = Ψ_u: plan.py's gathered_bytes / fsdp2_gathered_bytes).
A dequantized NF4 tile lives only inside the matmul (ltk/kernels/nf4.py): not counted.

Activations: plan.py's (Korthikanti et al. 2022 with FlashAttention, scaled to the compute dtype,
plus the fp32 logits) for the micro-batch b = batch/N, and LoRA's own: each adapted Linear keeps
its r-wide intermediate u = x·Aᵀ for B's gradient, r·b·s·t bytes (the frozen W no longer needs
its input, A does: the same tensor). That is r / (34·h/n_adapted) of a layer's activations —
under 1% at r = 8, h = 128 with 4 adapted Linears — but it is counted.

Communication per step: ddp all-reduces the adapters' gradients only, t·ψ (once per step,
no_sync while accumulating). zero3 / fsdp2 all-gather every unit twice per micro-batch (forward,
backward) and reduce-scatter the trainable gradients once:

    ddp         all_reduce      t·ψ
    zero3/fsdp2 all_gather      2·m·Σ_u N·⌈P_u/N⌉      the frozen base travels, as bytes
                reduce_scatter  m·t·Σ_u N·⌈ψ_u/N⌉      only the adapters' gradients

so a LoRA step under zero3 moves about 2·m·(weights) where ddp moves t·ψ: sharding the frozen
base buys memory with bandwidth. Bytes on the wire: cost.wire_bytes (ring).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ltk.parallel import cost

METHODS = ("full", "lora", "qlora")
STRATEGIES = {"none": 0, "ddp": 0, "naive-ddp": 0, "torch-ddp": 0, "zero3": 3, "fsdp2": 3}
COMPONENTS = ("base_nf4_packed", "base_nf4_stats", "base_full", "trainable", "gradients", "optimizer_states")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class Unit:
    """One sharding unit (the root, or a transformer block): bytes of its frozen storage,
    elements of its trainable parameters."""

    name: str
    frozen_full: int = 0  # bytes: frozen full-precision parameters
    nf4_packed: int = 0  # bytes: 4-bit codes
    nf4_stats: int = 0  # bytes: absmax codes, fp32 scales and offset
    trainable: int = 0  # elements ψ_u
    tensors: int = 0  # trainable parameter tensors (one Adam `step` each)
    groups: set = field(default_factory=set)  # AdamW groups (decay: 2-D, no decay) with trainable tensors


def nf4_bytes(n: int, blocksize: int = 64, blocksize2: int = 256) -> tuple[int, int]:
    """(packed, stats) bytes of one NF4LinearDQ of n weights (module docstring)."""
    blocks = -(-n // blocksize)
    return (n + 1) // 2, blocks + 4 * -(-blocks // blocksize2) + 4


def layout(family: str, cfg, method: str, r: int = 8, targets: str = "", compute_dtype: str = "fp32",
           dtype: str = "fp32") -> tuple[list[Unit], dict[str, Any]]:
    """The units of the model as it fine-tunes (root first, then the blocks) and what it holds
    in all: the model is built on the meta device and adapted by the run's own rules."""
    from ltk.models import get_family
    from ltk.models.lora import LoRALinear, apply_lora
    from ltk.models.qlora import _quant_targets
    from ltk.parallel.zero3 import default_units
    from ltk.training.adapters import DEFAULT_TARGETS

    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if r < 1:
        raise ValueError(f"--lora-r {r}: must be >= 1")
    if compute_dtype not in DTYPE_BYTES or dtype not in DTYPE_BYTES:
        raise ValueError(f"dtypes for a fine-tuning plan are fp32 or bf16, got {dtype!r} / {compute_dtype!r}")
    with torch.device("meta"):
        model = get_family(family).model_cls(cfg)
    num_params = sum(p.numel() for p in model.parameters())  # Ψ, the base's
    quantized = set(_quant_targets(model, None)) if method == "qlora" else set()
    q_ids = {id(model.get_submodule(n).weight): model.get_submodule(n) for n in quantized}
    q_bias = {id(m.bias) for m in q_ids.values() if m.bias is not None}
    pats = [t.strip() for t in (targets or DEFAULT_TARGETS[family]).split(",") if t.strip()]
    if method != "full":
        apply_lora(model, pats, r=r)  # raises for a pattern that matches nothing, or a tied weight
    t = 2 if dtype == "bf16" else (DTYPE_BYTES[compute_dtype] if method == "qlora" else 4)
    c = DTYPE_BYTES[compute_dtype]
    blocks = {id(m) for m in default_units(model)}
    prefixes = [(n + ".", Unit(n)) for n, m in model.named_modules() if id(m) in blocks]
    root = Unit("root")
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, p in model.named_parameters():  # each tensor once: a tied weight is one parameter
        unit = next((u for pre, u in prefixes if name.startswith(pre)), root)
        trains = method == "full" or p.requires_grad
        if trains:
            unit.trainable += p.numel()
            unit.tensors += 1
            unit.groups.add(p.dim() >= 2)
        elif id(p) in q_ids:
            packed, stats = nf4_bytes(p.numel())
            unit.nf4_packed += packed
            unit.nf4_stats += stats
        else:
            unit.frozen_full += p.numel() * (c if id(p) in q_bias else 4)
    units = [root] + [u for _, u in prefixes]
    info = {"num_params": num_params,
            "trainable_params": sum(u.trainable for u in units), "quantized_params": sum(
                model.get_submodule(n).weight.numel() for n in quantized),
            "adapted_layers": len(adapted), "adapted_per_block": len(adapted) // max(len(prefixes), 1),
            "trainable_bytes_per_element": t, "targets": pats if method != "full" else []}
    return units, info


def unit_bytes(u: Unit, t: int) -> int:
    """P_u: the stored weights of a unit, gathered whole (frozen + NF4 + trainable)."""
    return u.frozen_full + u.nf4_packed + u.nf4_stats + t * u.trainable


def plan_finetune(family: str, cfg, *, method: str, world: int, strategy: str = "ddp", batch: int = 8,
                  seq_len: int | None = None, micro_batches: int = 1, dtype: str = "fp32", r: int = 8,
                  targets: str = "", compute_dtype: str = "fp32", recompute: bool = False,
                  flash: bool = True) -> dict[str, Any]:
    """Bytes per rank (`components`, memory_breakdown's keys; and the totals plan.py prints) and
    bytes per step of one fine-tuning configuration (module docstring)."""
    from ltk.parallel.plan import model_shape

    if strategy not in STRATEGIES:
        raise ValueError(f"a fine-tuning plan covers --strategy {', '.join(STRATEGIES)}; got {strategy!r}")
    for flag, value in (("--world", world), ("--batch-size", batch), ("--micro-batches", micro_batches),
                        ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if strategy == "none" and world > 1:
        raise ValueError(f"--strategy none is one process; --world {world} needs ddp, zero3 or fsdp2")
    if batch % world:
        raise ValueError(f"the global batch of {batch} sequences (--batch-size) does not split over {world} ranks")
    units, info = layout(family, cfg, method, r, targets, compute_dtype, dtype)
    t, n, sharded = info["trainable_bytes_per_element"], world, STRATEGIES[strategy] == 3
    k = 12 if dtype == "bf16" else 2 * t  # Adam: fp32 master + moments, or 2 moments in the parameter's dtype

    def share(x: int) -> int:
        return -(-x // n) if sharded else x

    psi = [share(u.trainable) for u in units]  # trainable elements this rank holds, per unit
    # Adam's step scalars: one per tensor it steps; ZeRO-3 steps one flat piece per unit and group
    steps = sum(len(u.groups) for u in units) if strategy == "zero3" else sum(u.tensors for u in units)
    comp = {"base_nf4_packed": sum(share(u.nf4_packed) for u in units),
            "base_nf4_stats": sum(share(u.nf4_stats) for u in units),
            "base_full": sum(share(u.frozen_full) for u in units),
            "trainable": t * sum(psi), "gradients": t * sum(psi), "optimizer_states": k * sum(psi) + 4 * steps}

    s = model_shape(family, cfg)
    T = seq_len or getattr(cfg, "block_size", 1024)
    b = batch // world
    scale = 4 / 2 if dtype == "fp32" else 1.0  # Korthikanti counts 2-byte activations
    layer = cost.activation_bytes_per_layer(T, b, s.hidden, s.heads, 1, False, recompute, flash) * scale
    lora = 0 if recompute or method == "full" else info["adapted_per_block"] * r * b * T * t
    activations = int((layer + lora) * s.layers + b * T * s.vocab * 4)

    gathered, comm = 0, {}
    root, block = units[0], max(units[1:], key=lambda u: unit_bytes(u, t) + t * u.trainable)
    if sharded and n > 1:
        p_root, p_block = unit_bytes(root, t), unit_bytes(block, t)
        if strategy == "fsdp2":
            gathered = p_root + 3 * p_block + t * (root.trainable + 2 * block.trainable)
        else:
            gathered = p_root + 2 * p_block + t * (2 * root.trainable + 2 * block.trainable)
        comm = {"all_gather": 2 * micro_batches * sum(n * share(unit_bytes(u, t)) for u in units),
                "reduce_scatter": micro_batches * t * sum(n * share(u.trainable) for u in units)}
    elif n > 1:
        comm = {"all_reduce": t * info["trainable_params"]}
    weights = sum(comp[x] for x in ("base_nf4_packed", "base_nf4_stats", "base_full", "trainable"))
    total = weights + comp["gradients"] + comp["optimizer_states"] + activations + gathered
    return {"family": family, "method": method, "world": world, "strategy": strategy,
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
    lines = [f"{p['family']} fine-tuning ({what}) on {p['world']} ranks, {p['strategy']}, {p['dtype']}",
             f"  trainable parameters: {p['trainable_params']:,} of {p['num_params']:,} "
             f"({p['trainable_params'] / p['num_params']:.2%})", "  per rank:"]
    for k, v in p["components"].items():
        lines.append(f"    {k:18s} {v / mib:12.3f} MiB")
    for k in ("activations", "gathered", "total"):
        lines.append(f"    {k:18s} {p[k] / mib:12.3f} MiB")
    comm = p["comm"]["data_parallel"]
    ops = ", ".join(f"{op.replace('_', '-')} {b / mib:.3f} MiB" for op, b in comm.items()) or "none"
    lines.append(f"  communicated per step: {ops} ({p['comm_wire_bytes_per_step'] / mib:.3f} MiB sent per rank, ring)")
    return "\n".join(lines)
