"""The cost model of parallel training: memory per rank, bytes communicated per step, and the
pipeline bubble — the formulas every strategy in ltk/parallel/ is tested against.

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

Communication, payload bytes per optimizer step (ltk/parallel/dist.py defines payload and the ring
wire bytes; one all-reduce moves 2(N-1)/N · B on the wire, a reduce-scatter or an all-gather
(N-1)/N · B):

    DDP      all-reduce Ψg once per step (no_sync while accumulating)
    ZeRO-1   reduce-scatter Ψg once per step + all-gather Ψp of the updated parameters
    ZeRO-2   reduce-scatter Ψg per micro-batch (gradients live only as shards) + all-gather Ψp
    ZeRO-3   per micro-batch: all-gather Ψp in forward, again in backward, reduce-scatter Ψg

so on the wire ZeRO-1/2 equal DDP at m = 1 and ZeRO-3 moves 1.5x DDP (ZeRO §7.2.2).

FSDP2 (fully_shard, ltk/parallel/fsdp2.py) shards like ZeRO-3 and gathers by its own settings
(fsdp2_comm_bytes; Ψ_r the root unit's parameters: embeddings, positions, final norm, an untied head):

    FSDP2    per micro-batch: all-gather Ψ_r p once (the root is not resharded after forward) and
             every block's Ψp twice (once with reshard_after_forward false); reduce-scatter Ψg once
             per step (set_requires_gradient_sync(False) while accumulating)

measured equal, byte for byte, by counting the collectives of `ltk train --parallel fsdp2`
(ltk/parallel/comm_meter.py; tests/distributed/test_comm_plan.py).

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
    """Bytes per element of what each rank stores, and of the gradients it reduces."""

    param: int = 4  # the parameters the forward reads
    grad: int = 4
    optim: int = 8  # Adam's m and v in fp32; + 4 for an fp32 master copy under mixed precision
    reduce: int = 0  # gradient bytes per element in the reduction (0: as stored, `grad`)

    @property
    def comm_grad(self) -> int:
        return self.reduce or self.grad

    @classmethod
    def of(cls, dtype: str, reduce_dtype: str | None = None) -> "Precision":
        """fp32: 4/4/8. bf16/fp16 mixed precision: 2/2/12 (the fp32 master in K). reduce_dtype
        fp32 reduces (and keeps sharded) gradients in fp32: 4 bytes each on the wire."""
        sizes = {"fp32": 4, "bf16": 2, "fp16": 2}
        if dtype not in sizes:
            raise ValueError(f"unknown dtype {dtype!r}: choose fp32, bf16 or fp16")
        if reduce_dtype is not None and reduce_dtype not in sizes:
            raise ValueError(f"unknown reduce dtype {reduce_dtype!r}: choose fp32, bf16 or fp16")
        reduce = sizes[reduce_dtype] if reduce_dtype is not None and sizes[reduce_dtype] != sizes[dtype] else 0
        return cls(4, 4, 8, reduce) if dtype == "fp32" else cls(2, 2, 12, reduce)


def shard_numel(numel: int, n: int) -> int:
    """Elements one of n ranks holds of a flat buffer of numel (padded to a multiple of n)."""
    return math.ceil(numel / n)


def model_state_bytes(num_params: int, world: int, stage: int, prec: Precision = Precision()) -> dict[str, int]:
    """Bytes one data-parallel rank holds for parameters, gradients and optimizer states."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    full, shard = num_params, shard_numel(num_params, world)
    params = (shard if stage == 3 else full) * prec.param
    grads = shard * prec.comm_grad if stage >= 2 else full * prec.grad  # a reduced shard: in the reduce dtype
    optim = (shard if stage >= 1 else full) * prec.optim
    return {"params": params, "grads": grads, "optimizer": optim}


def zero_comm_bytes(num_params: int, stage: int, micro_batches: int = 1,
                    prec: Precision = Precision()) -> dict[str, int]:
    """Payload bytes per optimizer step, by collective, for DDP (stage 0) and ZeRO-1/2/3."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    g, p, m = num_params * prec.comm_grad, num_params * prec.param, micro_batches
    if stage == 0:
        return {"all_reduce": g}
    if stage == 1:
        return {"reduce_scatter": g, "all_gather": p}
    if stage == 2:
        return {"reduce_scatter": m * g, "all_gather": p}
    return {"all_gather": 2 * m * p, "reduce_scatter": m * g}


def fsdp2_comm_bytes(num_params: int, root_params: int, micro_batches: int = 1, prec: Precision = Precision(),
                     reshard_after_forward: bool = True) -> dict[str, int]:
    """Payload bytes per optimizer step of FSDP2 (module docstring): the root gathered once a
    micro-batch, the blocks twice (once without resharding), gradients reduce-scattered once a step."""
    blocks = num_params - root_params
    gathers = 2 if reshard_after_forward else 1
    return {"all_gather": micro_batches * prec.param * (root_params + gathers * blocks),
            "reduce_scatter": prec.comm_grad * num_params}


def fsdp2_pp_comm_bytes(stage_params: int, stage_root: int, micro_batches: int,
                        prec: Precision = Precision(), reshard_after_forward: bool = True) -> dict[str, int]:
    """FSDP2 stages under torch.distributed.pipelining (ltk/parallel/torch_pp_fsdp.py): the schedule
    turns resharding after *backward* and gradient sync off for every micro-batch but the last, not
    resharding after forward, so a block is gathered in each of the m forwards and once more in the
    first backward (then kept), the stage's root once; without resharding after forward every unit
    is gathered once a step. One reduce-scatter a step."""
    blocks = stage_params - stage_root
    gathers = micro_batches + 1 if reshard_after_forward else 1
    return {"all_gather": prec.param * (stage_root + gathers * blocks),
            "reduce_scatter": prec.comm_grad * stage_params}


WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0, "send": lambda n: 1.0,
        "all_to_all": lambda n: (n - 1) / n}  # an all-to-all keeps 1/n of its local tensor (ltk/parallel/cost_cp.py)


def wire_bytes(payload: dict[str, int], world: int) -> float:
    """Bytes one rank sends with ring collectives, for a payload-by-collective dict."""
    return sum(WIRE[op](world) * b for op, b in payload.items()) if world > 1 else 0.0


def activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: bool = False,
                               flash: bool = False) -> float:
    """Korthikanti et al. 2022 eqs. 1-2 (16-bit activations, dropout masks included). With
    `flash` the 5·a·s/h term — the a·s² scores, softmax and its dropout mask per layer — is
    dropped: FlashAttention never stores them (it keeps O(s) statistics per row instead)."""
    sbh = seq * batch * hidden
    if recompute:
        return 2.0 * sbh / (tp if sequence_parallel else 1)
    attn = 0.0 if flash else 5.0 * heads * seq / hidden
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


# == tensor + sequence parallel communication (ltk/parallel/tensor.py, ltk/parallel/tp_plan.py) ====
def _tp_collectives(batch: int, seq: int, hidden: int, layers: int, *, sequence_parallel: bool,
                    dtype_bytes: int, arch: str, bias: bool, positions: int) -> list[tuple[str, int]]:
    """Every collective one tensor-parallel rank issues in one forward + backward of one
    micro-batch, as (op, payload bytes); see tp_comm_bytes."""
    if arch not in ("gpt", "llama"):
        raise ValueError(f"arch must be 'gpt' or 'llama', got {arch!r}")
    act = batch * seq * hidden * dtype_bytes  # A: one (B, T, h) activation
    ce = [("all_reduce", max(4, dtype_bytes) * batch * seq)] * 3  # max, target logit, sum of exp, >= fp32
    if not sequence_parallel:  # embedding g; 2 g per layer; head f (backward); 2 f per layer (backward)
        return [("all_reduce", act)] * (4 * layers + 2) + ce
    moves = [("reduce_scatter", act), ("all_gather", act)] * (4 * layers + 2)
    if arch == "gpt":  # LayerNorm gains (+ biases), row-parallel biases, the position table
        grads = [hidden] * ((2 * layers + 1) * (2 if bias else 1)) + [hidden] * (2 * layers if bias else 0)
        grads += [positions * hidden]
    else:  # RMSNorm gains
        grads = [hidden] * (2 * layers + 1)
    return moves + ce + [("all_reduce", n * dtype_bytes) for n in grads]


def tp_comm_bytes(batch: int, seq: int, hidden: int, layers: int, tp: int, *, sequence_parallel: bool = False,
                  dtype_bytes: int = 4, arch: str = "gpt", bias: bool = True, positions: int = 0) -> dict[str, int]:
    """Payload bytes by collective that one tensor-parallel rank sends per micro-batch
    (forward + backward) for GPT / Llama as ltk/parallel/tp_plan.py shards them. A = b·s·h·e
    (micro-batch b, sequence s, hidden h, e = dtype_bytes), L layers, tp = n.

    Tensor parallel (Megatron-LM, Shoeybi et al. 2019, §3 and figure 4): each layer has two
    regions (attention, MLP), each entered by f (all-reduce of dX in backward) and left by g
    (all-reduce of Y in forward): 2 all-reduces forward + 2 backward per layer, of A each.
    Outside the layers: the vocab-parallel embedding ends in g (1 all-reduce forward), the
    vocab-parallel head starts with f (1 all-reduce backward), and the vocab-parallel
    cross-entropy all-reduces 3 numbers per token (max, target logit, sum of exp), in fp32
    (c = 4 bytes; 8 for fp64 logits):

        all_reduce = (4L + 2)·A + 3·c·b·s                          calls 4L + 5

    The vocabulary does not appear: the (b, s, V) logits are never gathered.

    Tensor + sequence parallel (Korthikanti et al. 2022, §4.2.2, figure 5): every g becomes
    ḡ (reduce-scatter forward, all-gather backward) and every f becomes f̄ (all-gather
    forward, reduce-scatter backward), each of the same payload A:

        reduce_scatter = all_gather = (4L + 2)·A                   calls 4L + 2 each
        all_reduce     = 3·c·b·s + e·P_sp                          calls 3 + (tensors in P_sp)

    On the ring, reduce-scatter + all-gather of A cost (n-1)/n·A each, i.e. one all-reduce:
    same wire bytes as plain TP, but norms and dropout hold 1/n of the activations. P_sp
    counts the replicated parameters that see only a sequence shard and whose gradients
    are therefore all-reduced over the tp group (one call per tensor, per micro-batch):

        GPT    LayerNorm (2L + 1)·h·(2 if bias else 1) + row-parallel biases 2L·h (if bias)
               + the position table `positions`·h (block_size rows: its gradient is dense)
        Llama  RMSNorm gains (2L + 1)·h

    tp = 1 sends nothing.
    """
    if tp <= 1:
        return {}
    out: dict[str, int] = {}
    for op, nbytes in _tp_collectives(batch, seq, hidden, layers, sequence_parallel=sequence_parallel,
                                      dtype_bytes=dtype_bytes, arch=arch, bias=bias, positions=positions):
        out[op] = out.get(op, 0) + nbytes
    return out


def tp_comm_calls(layers: int, tp: int, *, sequence_parallel: bool = False, arch: str = "gpt",
                  bias: bool = True) -> dict[str, int]:
    """Number of collectives by kind per micro-batch, for the same accounting as tp_comm_bytes."""
    if tp <= 1:
        return {}
    out: dict[str, int] = {}
    for op, _ in _tp_collectives(1, 1, 1, layers, sequence_parallel=sequence_parallel, dtype_bytes=1,
                                 arch=arch, bias=bias, positions=1):
        out[op] = out.get(op, 0) + 1
    return out
# == end of tensor + sequence parallel section ===============================================


# == pipeline parallel communication (ltk/parallel/pipeline.py, ltk/parallel/schedules.py) ==========
def pp_comm_bytes(stages: int, micro_batches: int, micro_batch_size: int, seq_len: int, hidden: int,
                  virtual: int = 1, dtype_bytes: int = 4, vocab: int | None = None) -> dict:
    """Payload bytes of one pipeline step (any schedule: they all move the same messages).

    A stage boundary carries, per micro-batch, one activation forward and its gradient
    backward, each b·s·h elements (GPT's (x, delta) pair is sent as the sum x + delta):

        per boundary   2 · m · b·s·h · bytes
        boundaries     p·v - 1, all between different ranks when p > 1 (none when p = 1)
        rank r sends   (2v - [r = 0] - [r = p-1]) · m · b·s·h · bytes, and receives as much

    The tied embedding (vocab given, p > 1): the first and the last rank each record one
    all-reduce of V·h·bytes per step (Megatron's embedding group of two ranks; ring wire
    2(n-1)/n = 1x the payload at n = 2); no other rank takes part. It is kept apart from
    the boundary traffic in `tied_all_reduce`.
    """
    if min(stages, micro_batches, micro_batch_size, seq_len, hidden, virtual, dtype_bytes) < 1:
        raise ValueError("pp_comm_bytes: every size must be >= 1")
    p, v, m = stages, virtual, micro_batches
    message = micro_batch_size * seq_len * hidden * dtype_bytes  # one (b, s, h) tensor
    if p == 1:
        per_rank = [0]
    else:
        per_rank = [(2 * v - (r == 0) - (r == p - 1)) * m * message for r in range(p)]
    tied = vocab * hidden * dtype_bytes if vocab is not None and p > 1 else 0
    return {"message": message, "per_boundary": 2 * m * message, "boundaries": p * v - 1 if p > 1 else 0,
            "send": sum(per_rank), "per_rank_send": per_rank, "per_rank_recv": list(per_rank),
            "tied_all_reduce": tied, "per_rank_all_reduce": [tied if r in (0, p - 1) else 0 for r in range(p)]}
# == end of pipeline parallel section ========================================================
