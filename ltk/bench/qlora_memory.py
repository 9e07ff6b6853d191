"""qlora-memory: the memory of QLoRA fine-tuning on a Llama-2-7B-shaped model, ours
(ltk/models/qlora.py on ltk/kernels/nf4.py, LoRA from ltk/models/lora.py) against bitsandbytes + PEFT, by
component, measured on one real weight of each distinct shape and multiplied by the count.

Components (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, §3; every byte of each tensor):
  nf4 codes       4-bit codes, two a byte: N·K/2 bytes a weight (the same on both sides)
  nf4 stats       double quantization: 8-bit absmax codes (one a 64-block), fp32 scales (one
                  per 256 codes) and one fp32 offset — ≈ 4.127 bits a weight with the codes
  code tables     the 16-value NF4 and 256-value dynamic code books: ours once per device (and
                  the quantizer's 64 KiB nearest-code table); bitsandbytes copies both into
                  every weight's quant_state (1,088 bytes a weight)
  embedding, head, norms  kept in bf16 by both (PEFT's prepare_model_for_kbit_training would
                  upcast them to fp32; not counted)
  lora adapters, gradients, AdamW states   r on all 7 projections of every block, measured
                  after one backward and one torch AdamW step on the real shapes
  nf4 matmul extra  what the 4-bit matmul holds beyond the result, training on a GPU:
                  bitsandbytes 0.50's MatMul4Bit dequantizes the whole weight to bf16 in its
                  backward (and in its forward when M > 1536 tokens, or where its heuristic
                  prefers), N·K·2 bytes plus the fp32 absmax, freed after: a transient of the
                  largest weight (11008×4096: 90 MB). Ours (Triton) never forms Ŵ; it
                  rebuilds the fp32 absmax (N·K/16 bytes) for the call and frees it, saving
                  only the stored codes for its backward, which rebuilds it again. (Our torch
                  backend, on a CPU, dequantizes like bitsandbytes and autograd keeps Ŵ for
                  dx.) (Formulas:
                  `matmul_transient_bytes`, `saved_for_backward_bytes`; a test checks the
                  latter against the tensors autograd really saves.)

Excluded: the activations. ltk/parallel/cost.py has Korthikanti et al.'s per-layer formula for a
GPT block (4h GeLU MLP, dropout masks), not for a Llama block (SwiGLU, no dropout), and the
two sides run the same math, so they hold the same activations; with checkpointing, the
block inputs kept for the recomputation (one (B, T, d) tensor a block on both sides: our
Llama does the deferred residual add before a checkpointed block) are shown apart. Also
excluded: the CUDA allocator's rounding (512-byte blocks), and anything a particular trainer
adds. Nothing is timed (median ms is 0); `peak MB` holds each component
in MiB and `extra` the exact bytes.

    ltk bench qlora-memory                                 # Llama-2-7B, r = 16, bf16 adapters
    ltk bench qlora-memory --rank 64 --adapter-dtype fp32  # PEFT's default adapter dtype
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter

import torch
import torch.nn as nn

from ltk.bench.harness import Row

SIDES = ("ours", "bitsandbytes+peft")
BLOCKSIZE, BLOCKSIZE2 = 64, 256
COMPUTE = torch.bfloat16
ADAPTER_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_TOTAL_KEYS = ("nf4 codes", "nf4 stats", "code tables", "embedding, head, norms", "lora adapters",
               "lora gradients", "adamw states")


def llama_shapes(n_embd: int, n_layer: int, n_head: int, intermediate_size: int, vocab_size: int):
    """({(N, K): weights of that shape in the whole model}, block-linear names of one block,
    numel of everything else (embedding, head, norms)), read from models.llama built on the
    meta device (no memory)."""
    from ltk.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                      intermediate_size=intermediate_size, vocab_size=vocab_size, block_size=16, rope_theta=1e4)
    with torch.device("meta"):
        model = Llama(cfg)
    counts: Counter = Counter()
    in_blocks = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("layers."):
            counts[tuple(mod.weight.shape)] += 1
            in_blocks.add(name + ".weight")
    one_block = [(n, tuple(m.weight.shape)) for n, m in model.layers[0].named_modules() if isinstance(m, nn.Linear)]
    rest = sum(p.numel() for n, p in model.named_parameters() if n not in in_blocks)
    return dict(counts), one_block, rest


# --- the two sides, measured on one layer ---------------------------------------------------

def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (views and shared tensors once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _one_step(layer: nn.Module, k: int, seed: int) -> torch.optim.Optimizer:
    """One forward, backward and AdamW step on two tokens: creates the gradients and states."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, k, generator=gen).to(COMPUTE)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-4)
    layer(x).float().square().mean().backward()
    opt.step()
    return opt


def _trainable(layer: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = [p for p in layer.parameters() if p.requires_grad]
    states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"lora adapters": _storage_bytes(params), "lora gradients": _storage_bytes(p.grad for p in params),
            "adamw states": _storage_bytes(states)}


class _Holder(nn.Module):
    """The smallest model PEFT wraps: one layer named "proj", its target."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def ours_layer(w: torch.Tensor, rank: int, adapter_dtype: torch.dtype, compute: torch.dtype = COMPUTE,
               backend: str = "torch") -> nn.Module:
    """Our QLoRA layer on the (N, K) weight w: NF4LinearDQ (double quantization) under a
    LoRALinear, adapters in `adapter_dtype` (its forward casts x to A's dtype and back)."""
    from ltk.models.lora import LoRALinear
    from ltk.models.qlora import NF4LinearDQ

    base = NF4LinearDQ.from_weight(w, None, BLOCKSIZE, compute, backend=backend, blocksize2=BLOCKSIZE2)
    layer = LoRALinear(base, r=rank, alpha=2 * rank)
    for p in (layer.lora_A, layer.lora_B):
        p.data = p.data.to(adapter_dtype)
    return layer


def bnb_peft_layer(w: torch.Tensor, rank: int, adapter_dtype: torch.dtype, compute: torch.dtype = COMPUTE):
    """(model, linear4bit): bitsandbytes' Linear4bit (nf4, double quant, blocksize 64) holding
    w, wrapped by PEFT's get_peft_model with LoRA r on it; adapters in `adapter_dtype`
    (PEFT's autocast_adapter_dtype makes them fp32, off for bf16)."""
    import bitsandbytes as bnb
    import peft

    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=compute, compress_statistics=True, quant_type="nf4",
                            device="meta")
    lin.weight = bnb.nn.Params4bit(w.to(compute), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=BLOCKSIZE).to("cpu")  # quantizes on the move
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(_Holder(lin), cfg, autocast_adapter_dtype=adapter_dtype == torch.float32)
    if adapter_dtype != torch.float32:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(adapter_dtype)
    return model, lin


def measure_ours(w: torch.Tensor, rank: int, adapter_dtype: torch.dtype, seed: int = 0) -> dict[str, int]:
    """Bytes of one QLoRA layer of ours on w after one step, counted by
    models.qlora.memory_breakdown."""
    from ltk.models.qlora import memory_breakdown

    layer = ours_layer(w, rank, adapter_dtype)
    opt = _one_step(layer, w.shape[1], seed)
    mb = memory_breakdown(layer, opt)
    return {"nf4 codes": mb["base_nf4_packed"], "nf4 stats": mb["base_nf4_stats"], "code tables": 0,
            **_trainable(layer, opt)}


def measure_bnb_peft(w: torch.Tensor, rank: int, adapter_dtype: torch.dtype, seed: int = 0) -> dict[str, int]:
    """Bytes of one QLoRA layer of bitsandbytes + PEFT on w after one step. Its quant_state
    holds the absmax codes (uint8), the nested absmax (fp32), the offset and two code books."""
    model, lin = bnb_peft_layer(w, rank, adapter_dtype)
    qs = lin.weight.quant_state
    opt = _one_step(model, w.shape[1], seed)
    return {"nf4 codes": _storage_bytes([lin.weight]),
            "nf4 stats": _storage_bytes([qs.absmax, qs.state2.absmax, qs.offset]),
            "code tables": _storage_bytes([qs.code, qs.state2.code]), **_trainable(model, opt)}


def shared_code_tables(side: str) -> int:
    """Code books held once per device, whatever the number of weights: ours keeps the NF4
    (16 fp32) and dynamic (256 fp32) codes and the quantizer's 65,536-entry uint8 table;
    bitsandbytes caches one dynamic code (its per-weight copies are counted per weight)."""
    return 16 * 4 + 256 * 4 + 65536 if side == "ours" else 256 * 4


# --- what the matmul holds beyond its output (formulas, GPU training path) -------------------

def saved_for_backward_bytes(side: str, n: int, k: int) -> int:
    """Tensors the 4-bit matmul of one (N, K) weight newly creates and keeps until its
    backward (the LoRA branch saves the same (M, r) and x on both sides, not counted): none
    on either side. Ours saves the stored codes and double-quantized scales and rebuilds the
    fp32 absmax in the backward (ltk/kernels/nf4.py NF4MatmulFunction); bitsandbytes' MatMul4Bit
    keeps references to the stored quant_state."""
    if side not in ("ours", "bitsandbytes+peft"):
        raise ValueError(f"side must be 'ours' or 'bitsandbytes+peft', got {side!r}")
    return 0


def matmul_transient_bytes(side: str, n: int, k: int) -> int:
    """Memory one 4-bit matmul call allocates and frees (beyond its output): bitsandbytes the
    fp32 absmax and the whole Ŵ in bf16 (backends/default/ops.py `_gemm_4bit_default_impl`
    and MatMul4Bit.backward's dequantize_4bit); ours the fp32 absmax only, rebuilt from the
    8-bit codes for the call."""
    absmax = 4 * math.ceil(n * k / BLOCKSIZE)
    return absmax + (n * k * COMPUTE.itemsize if side != "ours" else 0)


def matmul_extra_bytes(side: str, one_block: list, n_layer: int, checkpointing: bool) -> int:
    """The most the 4-bit matmuls hold at once beyond persistent memory and activations:
    the saved tensors of the blocks whose graph is alive (one block with checkpointing, as
    its recomputed forward is followed by its backward; all without), or the largest
    transient, whichever is more."""
    saved = sum(saved_for_backward_bytes(side, *shape) for _, shape in one_block)
    saved *= 1 if checkpointing else n_layer
    return max(saved, max(matmul_transient_bytes(side, *shape) for _, shape in one_block))


def checkpoint_inputs_bytes(side: str, n_layer: int, batch: int, seq_len: int, n_embd: int) -> int:
    """With activation checkpointing, the block inputs kept for the recomputation, bf16: the
    hidden states entering each block, on both sides (ltk/models/llama.py folds its deferred
    residual add into x before a checkpointed block, so it keeps one tensor, not two)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return n_layer * batch * seq_len * n_embd * COMPUTE.itemsize


# --- the benchmark -------------------------------------------------------------------------

def run(*, n_embd: int = 4096, n_layer: int = 32, n_head: int = 32, intermediate_size: int = 11008,
        vocab_size: int = 32000, rank: int = 16, adapter_dtype: str = "bf16", checkpointing: str = "both",
        batch: int = 1, seq_len: int = 4096, seed: int = 0) -> list[Row]:
    """Bytes by component, ours and bitsandbytes + PEFT, one Row each (mode "memory").

    The model dims default to Llama-2-7B (n_kv_head = n_head: no GQA). rank: LoRA r on all 7
    projections of every block. adapter_dtype: bf16 or fp32, for both sides (PEFT's default,
    autocast_adapter_dtype=True, is fp32; ours keeps the compute dtype, bf16). checkpointing:
    both, yes, no (activation checkpointing; changes the matmul extra). batch, seq_len: only
    for the checkpointed block inputs, shown apart (not in the total). Runs on a CPU."""
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {adapter_dtype!r}")
    variants = {"both": (True, False), "yes": (True,), "no": (False,)}
    if checkpointing not in variants:
        raise ValueError(f"checkpointing must be both, yes or no, got {checkpointing!r}")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    counts, one_block, rest = llama_shapes(n_embd, n_layer, n_head, intermediate_size, vocab_size)
    adt = ADAPTER_DTYPES[adapter_dtype]

    parts: dict[str, dict[str, tuple[int, dict]]] = {s: {} for s in SIDES}  # side -> label -> (bytes, extra)

    def add(side, label, nbytes, **extra):
        parts[side][label] = (nbytes, extra)

    totals: dict[str, Counter] = {s: Counter() for s in SIDES}
    for i, ((n, k), count) in enumerate(sorted(counts.items())):
        gen = torch.Generator().manual_seed(seed + i)
        w = (0.02 * torch.randn(n, k, generator=gen)).to(COMPUTE)  # a pretrained weight's scale
        for side, measure in (("ours", measure_ours), ("bitsandbytes+peft", measure_bnb_peft)):
            one = measure(w, rank, adt, seed)
            for key, b in one.items():
                totals[side][key] += b * count
            for key in ("nf4 codes", "nf4 stats"):
                add(side, f"{key} {n}x{k} ×{count}", one[key] * count, per_weight=one[key], count=count,
                    how="measured on one weight × count")
        del w
    for side in SIDES:
        totals[side]["code tables"] += shared_code_tables(side)
        totals[side]["embedding, head, norms"] = rest * COMPUTE.itemsize
        add(side, "code tables", totals[side]["code tables"], how="per weight measured, shared ones counted once")
        add(side, "embedding, head, norms (bf16)", rest * COMPUTE.itemsize, numel=rest, how="ltk.models.llama on meta")
        for key in ("lora adapters", "lora gradients", "adamw states"):
            label = f"{key} r={rank} ({adapter_dtype})" if key == "lora adapters" else key
            add(side, label, totals[side][key], how="measured on one layer of each shape × count")
    persistent = {s: sum(totals[s][k] for k in _TOTAL_KEYS) for s in SIDES}
    for ckpt in variants[checkpointing]:
        tag = "checkpointing" if ckpt else "no checkpointing"
        for side in SIDES:
            extra = matmul_extra_bytes(side, one_block, n_layer, ckpt)
            add(side, f"nf4 matmul extra, {tag}", extra, how="formula (saved for backward, transient)")
            add(side, f"total, {tag}", persistent[side] + extra, how="sum of the components above")
    for side in SIDES:
        add(side, f"checkpointed block inputs B={batch} T={seq_len} (not in total)",
            checkpoint_inputs_bytes(side, n_layer, batch, seq_len, n_embd), in_total=False,
            how="activations kept by checkpointing, apart: equal on both sides")

    rows = []
    shape_note = f"n_embd={n_embd},n_layer={n_layer},n_head={n_head},inter={intermediate_size},vocab={vocab_size}"
    for side in SIDES:
        for label, (nbytes, extra) in parts[side].items():
            rows.append(Row.stamped("cpu", op="qlora-memory", shape=label, dtype="bf16", mode="memory", provider=side,
                                    median_ms=0.0, p20_ms=0.0, p80_ms=0.0, runs=0, peak_mem_mb=nbytes / 2**20,
                                    extra=json.dumps({"bytes": nbytes, "model": shape_note, "rank": rank,
                                                      "adapter_dtype": adapter_dtype, **extra}, sort_keys=True)))
    print_comparison(parts)
    return rows


def print_comparison(parts: dict, file=None) -> None:
    """Side by side in MiB, with the verdict per total (stderr, so `--json` on stdout stays clean)."""
    file = file or sys.stderr
    ours, theirs = parts["ours"], parts["bitsandbytes+peft"]
    print(f"{'component':58s} {'ours MiB':>12s} {'bnb+PEFT MiB':>13s} {'ours − bnb':>12s}", file=file)
    for label in ours:
        a, b = ours[label][0] / 2**20, theirs[label][0] / 2**20
        print(f"  {label:56s} {a:12.2f} {b:13.2f} {a - b:+12.2f}", file=file)
    for label in ours:
        if label.startswith("total"):
            a, b = ours[label][0], theirs[label][0]
            verdict = "ours ≤ bitsandbytes+peft" if a <= b else "ours > bitsandbytes+peft"
            print(f"verdict ({label}): {verdict} by {abs(a - b) / 2**20:.2f} MiB", file=file)
