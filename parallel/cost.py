"""The cost model of parallel training: memory per rank, bytes communicated per step, and the
pipeline bubble — the formulas every strategy in parallel/ is tested against.

Notation: Ψ parameters, N data-parallel ranks (the ZeRO partition), m micro-batches per step
(gradient accumulation, or pipeline micro-batches), p / g bytes per parameter / gradient
element as stored (fp32: 4 / 4; bf16 mixed precision: 2 / 2), K bytes of optimizer state per
parameter (Adam in fp32: m and v, 8; mixed precision adds the fp32 master copy: 12).

Memory for model states (Rajbhandari et al. 2020, "ZeRO", §5 and figure 1; K = 12, p = g = 2):

    DDP      (p + g + K) Ψ          = 16Ψ
    ZeRO-1   (p + g) Ψ + K Ψ/N      = 4Ψ + KΨ/N
    ZeRO-2   p Ψ + (g + K) Ψ/N      = 2Ψ + (2 + K)Ψ/N
    ZeRO-3   (p + g + K) Ψ/N        = 16Ψ/N

A shard holds ceil(Ψ/N) elements (the flat buffer is padded to a multiple of N), which is what
a rank really allocates when Ψ does not divide evenly.

Communication, payload bytes per optimizer step (parallel/dist.py defines payload and the ring
wire bytes; one all-reduce moves 2(N-1)/N · B on the wire, a reduce-scatter or an all-gather
(N-1)/N · B):

    DDP      all-reduce Ψg once per step (no_sync while accumulating)
    ZeRO-1   reduce-scatter Ψg once per step + all-gather Ψp of the updated parameters
    ZeRO-2   reduce-scatter Ψg per micro-batch (gradients live only as shards) + all-gather Ψp
    ZeRO-3   per micro-batch: all-gather Ψp in forward, again in backward, reduce-scatter Ψg

so on the wire ZeRO-1/2 equal DDP at m = 1 and ZeRO-3 moves 1.5x DDP (ZeRO §7.2.2).

Activations per transformer layer, 16-bit, (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", eqs. 1-2 and §4.2), s sequence, b micro-batch,
h hidden, a heads, t tensor-parallel degree:

    no parallelism              s·b·h·(34 + 5·a·s/h)
    tensor parallel             s·b·h·(10 + 24/t + 5·a·s/(h·t))
    tensor + sequence parallel  s·b·h·(34 + 5·a·s/h) / t
    full recomputation          2·s·b·h                     (only the layer input is kept)

Pipeline bubble (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters", §2.2): with p stages and m micro-batches, GPipe and 1F1B idle (p-1)/m of the ideal
time, interleaved 1F1B with v virtual stages per rank (p-1)/(v·m). As a fraction of the whole
step that is (p-1)/(m+p-1) (and (p-1)/(v·m+p-1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ZERO_STAGES = (0, 1, 2, 3)  # 0 = plain data parallel (DDP)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what each rank stores."""

    param: int = 4  # the parameters the forward reads
    grad: int = 4
    optim: int = 8  # Adam's m and v in fp32; + 4 for an fp32 master copy under mixed precision

    @classmethod
    def of(cls, dtype: str) -> "Precision":
        if dtype == "fp32":
            return cls(4, 4, 8)
        if dtype in ("bf16", "fp16"):
            return cls(2, 2, 12)
        raise ValueError(f"unknown dtype {dtype!r}: choose fp32, bf16 or fp16")


def shard_numel(numel: int, n: int) -> int:
    """Elements one of n ranks holds of a flat buffer of numel (padded to a multiple of n)."""
    return math.ceil(numel / n)


def model_state_bytes(num_params: int, world: int, stage: int, prec: Precision = Precision()) -> dict[str, int]:
    """Bytes one data-parallel rank holds for parameters, gradients and optimizer states."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    full, shard = num_params, shard_numel(num_params, world)
    params = (shard if stage == 3 else full) * prec.param
    grads = (shard if stage >= 2 else full) * prec.grad
    optim = (shard if stage >= 1 else full) * prec.optim
    return {"params": params, "grads": grads, "optimizer": optim}


def zero_comm_bytes(num_params: int, stage: int, micro_batches: int = 1, prec: Precision = Precision()) -> dict[str, int]:
    """Payload bytes per optimizer step, by collective, for DDP (stage 0) and ZeRO-1/2/3."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    g, p, m = num_params * prec.grad, num_params * prec.param, micro_batches
    if stage == 0:
        return {"all_reduce": g}
    if stage == 1:
        return {"reduce_scatter": g, "all_gather": p}
    if stage == 2:
        return {"reduce_scatter": m * g, "all_gather": p}
    return {"all_gather": 2 * m * p, "reduce_scatter": m * g}


WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0, "send": lambda n: 1.0}


def wire_bytes(payload: dict[str, int], world: int) -> float:
    """Bytes one rank sends with ring collectives, for a payload-by-collective dict."""
    return sum(WIRE[op](world) * b for op, b in payload.items()) if world > 1 else 0.0


def activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: bool = False) -> float:
    """Korthikanti et al. 2022 eqs. 1-2 (16-bit activations, dropout masks included)."""
    sbh = seq * batch * hidden
    if recompute:
        return 2.0 * sbh / (tp if sequence_parallel else 1)
    attn = 5.0 * heads * seq / hidden
    if sequence_parallel:
        return sbh * (34.0 + attn) / tp
    return sbh * (10.0 + 24.0 / tp + attn / tp)


def bubble_fraction(stages: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle time over ideal compute time: (p-1)/(v·m) (Narayanan et al. 2021 §2.2)."""
    if stages < 1 or micro_batches < 1 or virtual < 1:
        raise ValueError("stages, micro_batches and virtual must be >= 1")
    return (stages - 1) / (virtual * micro_batches)


def bubble_share_of_step(stages: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle time over the whole step: (p-1)/(v·m + p-1)."""
    return (stages - 1) / (virtual * micro_batches + stages - 1)
