"""Context parallelism's cost model: what splitting the sequence over c ranks costs per rank in
memory, bytes per step and attention work, for ring attention and for Ulysses. ltk/parallel/plan.py
and ltk/parallel/simulator.py apply these; the long-context lab measures against them.

Notation: c context-parallel degree, t tensor-parallel degree, B sequences per micro-batch, T
tokens per sequence (after padding, below), H query heads, H_kv key/value heads, D head dim
(h = H·D), L layers, e bytes per element in the compute dtype, e_g bytes per element of dK/dV as
the ring's backward accumulates them (e, or 4 when it accumulates in fp32). With t > 1 each rank
holds H/t query heads and ⌈H_kv/t⌉ K/V heads (a K/V head is replicated when t > H_kv).

Padding. The sequence is cut into 2c chunks (ltk/parallel/context_parallel.py, whichever the
split and the implementation: one sharding for all of them); zig-zag gives rank r chunks r and
2c-1-r (Megatron-LM's context parallel, zhuzilin/ring-flash-attention), contiguous chunks 2r and
2r+1, so T is padded up to a multiple of 2c:
    T' = ⌈T/2c⌉·2c.
The padded rows are real rows of every tensor: memory, bytes and compute below count T', the
throughput counts only the real T tokens.

Activation memory per rank (the peak: the backward of the last layer, every layer's activations
still stored). Each layer stores what it stores without CP at T'/c tokens — Korthikanti et al.
2022 eqs. 1-2 (cost.activation_bytes_per_layer), FlashAttention-style (no s² scores: the kernel
keeps a log-sum-exp per row) — since attention saves its local q, k, v, out and log-sum-exp. On
top, once, the communication buffers alive at that peak:

    ring      S_kv = 2·B·(T'/c)·⌈H_kv/t⌉·D                         elements of one K + V shard
              forward: 2·S_kv·e       the block being attended and the next one arriving
              backward: 2·S_kv·e + 2·S_kv·e_g   plus the dK/dV being accumulated and the next
              peak = 2·S_kv·(e + e_g)
    Ulysses   after the all-to-all a rank holds q, k, v, out head-sharded over the whole
              sequence, B·T'·(H/(c·t))·D each for q and out, B·T'·k_r·D for k and v with
              k_r = ⌈H_kv/(c·t)⌉ K/V heads per rank (repeated when c·t > H_kv); while an
              all-to-all runs its input and output coexist, so at the peak (a layer's backward:
              dO in, dQ, dK, dV out) one such set lives beside the sequence-sharded copies:
              peak = B·T'·D·(2·H/(c·t) + 2·k_r)·e

Bytes per micro-batch per rank (payload; ltk/parallel/dist.py's accounting):

    ring      forward, per layer: c-1 sends of the local K and V shard          (c-1)·S_kv·e
              backward, per layer: c-1 sends of K, V again, and c hops of the traveling
              dK/dV (ltk/parallel/ring_attention.py: a buffer travels with its K/V, each rank
              adds its contribution, and one last hop brings it home)   (c-1)·S_kv·e + c·S_kv·e_g
              step: L·S_kv·(2(c-1)·e + c·e_g), + L·(c-1)·S_kv·e with full recomputation (the
              forward's ring runs again in the backward). Payload = bytes on the wire. The ring
              accumulates dK/dV in fp32 (e_g = 4) whatever the compute dtype.
    Ulysses   per layer forward 4 all-to-alls: q, k, v in (sequence- to head-sharded), out back;
              backward the same 4 (dO in; dQ, dK, dV back). The local tensors are
              Q = O = B·(T'/c)·(H/t)·D and K = V = B·(T'/c)·(c·k_r)·D elements, so
              payload per layer and direction = (2·Q + 2·K)·e; an all-to-all sends (c-1)/c of its
              local tensor (cost.WIRE["all_to_all"]); + the forward's 4 with recomputation.

With c = 1 both are zero.

Attention work of causal masking (Brandon et al. 2023, "Striped Attention"; Liu et al. 2023,
"Ring Attention"): split the sequence into n chunks; query chunk i attends key chunks 0..i, the
diagonal block half-masked (score_blocks counts it 1/2, the exact causal work of a large block).
Contiguous split, n = k·c, rank r holds chunks r·k .. r·k+k-1:
    blocks(r) = k²·(r + 1/2),   mean k²·c/2,   max / mean = (2c - 1)/c
— the last rank does nearly twice the mean work. Zig-zag, n = 2c·k, chunk i on rank
min(i mod 2c, 2c-1 - i mod 2c): every rank holds pairs (i, 2c-1-i) whose rows sum to 2c blocks,
so all ranks do equal work. Ulysses splits heads for attention: balanced by construction.
"""
from __future__ import annotations

import math

from ltk.parallel import cost

CP_IMPLS = ("ring", "ulysses")
SPLITS = ("zigzag", "contiguous")


def _check_impl(impl: str) -> None:
    if impl not in CP_IMPLS:
        raise ValueError(f"unknown context-parallel implementation {impl!r}: choose {' or '.join(CP_IMPLS)}")


def padded_seq_len(seq: int, cp: int, impl: str = "ring", split: str = "zigzag") -> int:
    """T' = ⌈T/2c⌉·2c (module docstring); T at c = 1."""
    _check_impl(impl)
    if split not in SPLITS:
        raise ValueError(f"unknown sequence split {split!r}: choose {' or '.join(SPLITS)}")
    if cp < 1 or seq < 1:
        raise ValueError(f"sequence length {seq} and context-parallel degree {cp} must be >= 1")
    if cp == 1:
        return seq
    return math.ceil(seq / (2 * cp)) * 2 * cp  # 2c chunks for every split (context_parallel.padded_length)


def check_cp(cp: int, impl: str, heads: int, kv_heads: int, tp: int = 1) -> None:
    """Refuse a layout no run could have: Ulysses gives each of the c·t ranks of a CP x TP
    group H/(c·t) whole query heads."""
    _check_impl(impl)
    if cp < 1:
        raise ValueError(f"--cp {cp}: the context-parallel degree must be >= 1")
    if impl == "ulysses" and heads % (cp * tp):
        raise ValueError(f"Ulysses splits the attention heads over cp x tp = {cp} x {tp} = {cp * tp} ranks, "
                         f"but the model has {heads} heads (not divisible): choose cp x tp dividing {heads}, "
                         "or --cp-impl ring")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key/value heads")


def kv_heads_per_rank(kv_heads: int, tp: int, cp: int = 1) -> int:
    """⌈H_kv/(c·t)⌉: K/V heads one rank holds (c = 1: the ring's, c > 1: Ulysses' after the all-to-all)."""
    return math.ceil(kv_heads / (cp * tp))


def activation_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, cp: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: bool = False, flash: bool = True) -> float:
    """Korthikanti et al.'s stored bytes per layer (16-bit accounting) at the local T'/c tokens;
    `seq` is the padded T' (padded_seq_len), which c must divide."""
    if seq % cp:
        raise ValueError(f"the padded sequence of {seq} tokens does not split over cp={cp} ranks")
    return cost.activation_bytes_per_layer(seq // cp, batch, hidden, heads, tp, sequence_parallel, recompute, flash)


def peak_buffer_bytes(seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, cp: int, impl: str,
                      tp: int = 1, dtype_bytes: int = 2, dkv_bytes: int | None = None) -> int:
    """Bytes of the communication buffers alive at the activation peak, once per rank (module
    docstring): ring 2·S_kv·(e + e_g), Ulysses B·T'·D·(2·H/(c·t) + 2·k_r)·e. `seq` is T'."""
    _check_impl(impl)
    if cp == 1:
        return 0
    e, eg = dtype_bytes, dkv_bytes or 4  # the ring accumulates dK/dV in fp32
    if impl == "ring":
        s_kv = 2 * batch * (seq // cp) * kv_heads_per_rank(kv_heads, tp) * head_dim
        return 2 * s_kv * (e + eg)
    q_heads = heads // (cp * tp)
    return batch * seq * head_dim * (2 * q_heads + 2 * kv_heads_per_rank(kv_heads, tp, cp)) * e


def comm_bytes_per_layer(seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, cp: int, impl: str,
                         tp: int = 1, dtype_bytes: int = 2, dkv_bytes: int | None = None) -> dict[str, dict[str, int]]:
    """{"forward": {op: payload}, "backward": {op: payload}} one rank sends per layer and
    micro-batch (module docstring); op "send" for the ring, "all_to_all" for Ulysses."""
    _check_impl(impl)
    if cp == 1:
        return {"forward": {}, "backward": {}}
    e, eg, local = dtype_bytes, dkv_bytes or 4, batch * (seq // cp) * head_dim
    if impl == "ring":
        s_kv = 2 * local * kv_heads_per_rank(kv_heads, tp)
        return {"forward": {"send": (cp - 1) * s_kv * e}, "backward": {"send": (cp - 1) * s_kv * e + cp * s_kv * eg}}
    q = local * (heads // tp)
    k = local * cp * kv_heads_per_rank(kv_heads, tp, cp)
    per = (2 * q + 2 * k) * e
    return {"forward": {"all_to_all": per}, "backward": {"all_to_all": per}}


def comm_bytes(seq: int, batch: int, heads: int, kv_heads: int, head_dim: int, layers: int, cp: int, impl: str,
               tp: int = 1, dtype_bytes: int = 2, dkv_bytes: int | None = None,
               recompute: bool = False) -> dict[str, int]:
    """Payload bytes by op one rank sends per micro-batch (forward + backward of `layers` layers;
    full recomputation runs the forward's communication once more)."""
    per = comm_bytes_per_layer(seq, batch, heads, kv_heads, head_dim, cp, impl, tp, dtype_bytes, dkv_bytes)
    out: dict[str, int] = {}
    for phase, times in (("forward", 2 if recompute else 1), ("backward", 1)):
        for op, n in per[phase].items():
            out[op] = out.get(op, 0) + times * layers * n
    return out


def score_blocks(cp: int, chunks: int | None = None, split: str = "zigzag", diagonal: float = 0.5) -> list[float]:
    """Causal score blocks each of the cp ranks computes when the sequence is cut into `chunks`
    equal chunks (default 2·cp), a diagonal block counting `diagonal` (1/2: its exact causal
    work; 1: a kernel that computes it whole and masks). Contiguous: rank r holds chunks
    r·k .. r·k+k-1 (k = chunks/cp); zig-zag: chunk i goes to rank min(i mod 2c, 2c-1 - i mod 2c)."""
    if split not in SPLITS:
        raise ValueError(f"unknown sequence split {split!r}: choose {' or '.join(SPLITS)}")
    n = chunks or 2 * cp
    if cp < 1 or n % (2 * cp if split == "zigzag" else cp):
        raise ValueError(f"{n} chunks do not split over {cp} ranks by the {split} rule "
                         f"(needs a multiple of {2 * cp if split == 'zigzag' else cp})")
    out = [0.0] * cp
    for i in range(n):  # query chunk i: i full blocks below the diagonal, one diagonal block
        if split == "contiguous":
            r = i // (n // cp)
        else:
            j = i % (2 * cp)
            r = min(j, 2 * cp - 1 - j)
        out[r] += i + diagonal
    return out


def imbalance(blocks: list[float]) -> float:
    """max / mean of per-rank work: 1 is balanced; the contiguous causal split gives (2c-1)/c."""
    return max(blocks) * len(blocks) / sum(blocks)
