"""QLoRA model surgery (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv 2305.14314, §3): the frozen base weights of the transformer blocks stored in 4-bit
NormalFloat with double-quantized scales, LoRA adapters in the compute dtype on top.

    quantize_model(model)                    block Linears -> NF4 (in place); embedding, norms, head stay
    prepare_qlora(model, ["wq", "wv"], r=8)  quantize + apply_lora + activation checkpointing
    from_pretrained_qlora(path)              a Hugging Face folder, quantized while it loads
    memory_breakdown(model, optimizer)       bytes: frozen 4-bit / frozen full / trainable / grads / states
    dequantize_model(model)                  NF4 -> full-precision nn.Linear (LoRA kept), e.g. to merge

The forward of one QLoRA layer (QLoRA §3, eq. 5), compute dtype c (bf16 in the paper):

    Y_c = X_c · doubleDequant(c1_fp32, c2_k-bit, W_NF4)ᵀ + s · X_c A_cᵀ B_cᵀ
    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W): absmax_b ≈ DYN[c2_b] · c1_{b/256} + offset,
                               then ŵ_i = NF4[q_i] · absmax_{i/64}

Only A and B get gradients; the backward through the base needs dX = dY · Ŵ, which the NF4
matmul gives without ever storing Ŵ (ltk/kernels/nf4.py). Storage of a quantized weight with
double quantization (per layer, blocksize 64, second-level blocks of 256):

    bits/param = 4 + 8/64 + 32/(64·256) ≈ 4.127    (+ one fp32 offset a layer)
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ltk.kernels.nf4 import NF4Linear, dequantize_absmax, dequantize_nf4, nf4_matmul_dq, quantize_absmax, quantize_nf4
from ltk.models.lora import LoRALinear, _collapse, _matches, _set_module, apply_lora, base_linears


class NF4LinearDQ(NF4Linear):
    """An NF4Linear whose per-block absmax is itself quantized (QLoRA §3, "Double
    Quantization"): buffers `packed` (uint8, two codes a byte), `absmax_codes` (uint8, one a
    64-block), `absmax_scales` (fp32, one per 256 codes) and `absmax_offset` (fp32 scalar, the
    mean subtracted before quantizing). absmax is dequantized on every forward (n/64 values,
    negligible next to the matmul), so the fp32 absmax is never stored."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 compute_dtype: torch.dtype = torch.bfloat16, backend: str = "auto", blocksize2: int = 256,
                 device=None):
        super().__init__(in_features, out_features, bias, blocksize, compute_dtype, backend, device=device)
        nblocks = self._buffers.pop("absmax").numel()  # replaced by its 8-bit codes and scales
        self.blocksize2 = blocksize2
        self.register_buffer("absmax_codes", torch.zeros(nblocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scales", torch.zeros(-(-nblocks // blocksize2), dtype=torch.float32,
                                                          device=device))
        self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                    compute_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                    blocksize2: int = 256) -> "NF4LinearDQ":
        """Quantize a (out, in) weight: NF4 codes + absmax, then absmax -> 8-bit codes, scales, offset."""
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, blocksize, compute_dtype, backend, blocksize2, device=weight.device)
        packed, absmax = quantize_nf4(weight.detach(), blocksize)
        codes, scales, offset = quantize_absmax(absmax, blocksize2)
        for buf, v in ((m.packed, packed), (m.absmax_codes, codes), (m.absmax_scales, scales),
                       (m.absmax_offset, offset)):
            buf.copy_(v)
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(compute_dtype))
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                    backend: str = "auto", blocksize2: int = 256) -> "NF4LinearDQ":
        return cls.from_weight(linear.weight, linear.bias, blocksize, compute_dtype, backend, blocksize2)

    def absmax_values(self) -> torch.Tensor:
        """absmax_b ≈ DYN[code_b] · scale_{b // 256} + offset, fp32 (the first dequant of eq. 5)."""
        return dequantize_absmax(self.absmax_codes, self.absmax_scales.float(), self.absmax_offset.float(),
                                 self.blocksize2)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.absmax_values(), (self.out_features, self.in_features),
                              self.blocksize, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the absmax is rebuilt inside the matmul (and again in its backward), never kept
        y = nf4_matmul_dq(x.to(self.compute_dtype), self.packed, self.absmax_codes, self.absmax_scales,
                          self.absmax_offset, (self.out_features, self.in_features), self.blocksize,
                          self.blocksize2, self.backend)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", double_quant=True, blocksize2={self.blocksize2}"


def _nf4(weight, bias, blocksize, compute_dtype, double_quant, backend) -> NF4Linear:
    if weight.is_meta:  # a model built on the meta device: the storage's shapes only, its codes made later
        out_f, in_f = weight.shape  # where each rank loads its shard (ltk/training/instruct_setup.py)
        m = NF4LinearDQ(in_f, out_f, bias is not None, blocksize, compute_dtype, backend, device="meta") \
            if double_quant else NF4Linear(in_f, out_f, bias is not None, blocksize, compute_dtype, backend,
                                           device="meta")
    elif double_quant:
        m = NF4LinearDQ.from_weight(weight, bias, blocksize, compute_dtype, backend)
    else:  # NF4Linear.from_linear, from a bare weight
        m = NF4Linear(weight.shape[1], weight.shape[0], bias is not None, blocksize, compute_dtype, backend,
                      device=weight.device)
        packed, absmax = quantize_nf4(weight.detach(), blocksize)
        m.packed.copy_(packed)
        m.absmax.copy_(absmax)
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(compute_dtype))
    for p in m.parameters():  # the base is frozen (its bias too)
        p.requires_grad_(False)
    return m


def _block_linear(name: str) -> bool:
    """Inside the transformer blocks: the path goes through a ModuleList index (h.3., layers.0.)."""
    return re.search(r"(^|\.)\d+\.", name) is not None


def _quant_targets(model: nn.Module, targets) -> list[str]:
    """Names of the nn.Linears to quantize; refuses tied weights and LoRA layers by name."""
    if any(isinstance(m, LoRALinear) and not m.quantized for m in model.modules()):
        raise ValueError("the model already has LoRA layers on full-precision bases: quantize first, then "
                         "apply LoRA (prepare_qlora does both in that order)")
    linears = {n: m for n, m in base_linears(model).items() if isinstance(m, nn.Linear)}
    if targets is None:
        chosen = sorted(n for n in linears if _block_linear(n))
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        unmatched = [p for p in targets if not any(_matches(n, p) for n in linears)]
        if unmatched:
            raise ValueError(f"quantization target patterns matched no nn.Linear: {unmatched}; "
                             f"available: {', '.join(sorted({_collapse(n) for n in linears}))}")
        chosen = sorted(n for n in linears if any(_matches(n, p) for p in targets))
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for n in chosen:
        if len(owners[id(linears[n].weight)]) > 1:
            raise ValueError(f"cannot quantize {n}: its weight is tied to {owners[id(linears[n].weight)]} "
                             "(the embedding stays in full precision, and so does a head tied to it)")
    return chosen


def quantize_model(model: nn.Module, targets=None, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                   double_quant: bool = True, backend: str = "auto") -> nn.Module:
    """Replace nn.Linears by NF4 ones, in place, and return the model. Default targets: every
    Linear inside the transformer blocks; `targets` takes name patterns as apply_lora does
    ("wq", "attn.wq", "layers.*.mlp.w2"). Embeddings, norms and the head stay in full
    precision, as in QLoRA; a weight tied to another (GPT's head = embedding) is refused.
    Each Linear is quantized and dropped before the next, so at most one extra full-precision
    weight exists at a time. double_quant=True stores NF4LinearDQ (≈4.127 bits/param), else
    NF4Linear (4.5)."""
    for name in _quant_targets(model, targets):
        lin = model.get_submodule(name)
        _set_module(model, name, _nf4(lin.weight, lin.bias, blocksize, compute_dtype, double_quant, backend))
        del lin  # the last reference to the full-precision weight goes with the module
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The inverse surgery (a full-precision copy of the quantized weights, in place): every
    NF4Linear -> nn.Linear(dequantized W) in `dtype` (default its compute dtype); a LoRALinear
    on an NF4 base becomes one on the full-precision Linear with the same A and B, which can
    then be merged (merge_lora / remove_lora)."""
    def plain(m: NF4Linear) -> nn.Linear:
        dt = dtype or m.compute_dtype
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.packed.device, dtype=dt)
        lin.weight = nn.Parameter(m.dequantized_weight(dt).detach(), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dt), requires_grad=False)
        return lin

    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear) and m.quantized:
            new = LoRALinear(plain(m.base), m.r, m.alpha, 0.0, m.use_rslora)
            new.lora_A, new.lora_B, new.lora_dropout = m.lora_A, m.lora_B, m.lora_dropout
            _set_module(model, name, new)
    for name, m in base_linears(model).items():
        if isinstance(m, NF4Linear):
            _set_module(model, name, plain(m))
    return model


def prepare_qlora(model: nn.Module, lora_targets, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                  use_rslora: bool = False, quant_targets=None, compute_dtype: torch.dtype = torch.bfloat16,
                  gradient_checkpointing: bool = True, blocksize: int = 64, double_quant: bool = True,
                  backend: str = "auto") -> nn.Module:
    """QLoRA in one call: quantize_model, then apply_lora (A, B in the compute dtype; every
    other parameter frozen), and turn on the model's activation checkpointing (QLoRA trains
    with it: the activations, not the 4-bit weights, then dominate memory)."""
    quantize_model(model, quant_targets, blocksize, compute_dtype, double_quant, backend)
    apply_lora(model, lora_targets, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    if gradient_checkpointing:
        if not hasattr(model, "activation_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no activation_checkpointing flag; "
                             "pass gradient_checkpointing=False")
        model.activation_checkpointing = True
    return model


def _retie(model: nn.Module) -> None:
    from ltk.models.gpt import GPT
    from ltk.models.llama import Llama
    if isinstance(model, GPT):
        model.lm_head.weight = model.wte.weight
    elif isinstance(model, Llama) and model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def from_pretrained_qlora(path, targets=None, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                          double_quant: bool = True, backend: str = "auto") -> nn.Module:
    """A local Hugging Face folder (as models.from_pretrained), quantized while it loads.

    What is done for memory: the model is built on the meta device (no weights allocated);
    the converted checkpoint tensors (one full-precision copy, the only one) are consumed
    layer by layer: each target weight is quantized to NF4 and its fp tensor dropped from the
    dict at once, so the peak is one full copy of the checkpoint plus the growing 4-bit model
    (models.from_pretrained followed by quantize_model would hold the model and the
    checkpoint, two full copies). The remaining tensors (embeddings, norms, head) are assigned
    without copying."""
    from ltk.models.hf.folder import read_folder

    model_cls, cfg, tensors = read_folder(path, backend=backend)
    with torch.device("meta"):
        model = model_cls(cfg)
    for name in _quant_targets(model, targets):
        w, b = tensors.pop(name + ".weight"), tensors.pop(name + ".bias", None)
        _set_module(model, name, _nf4(w, b, blocksize, compute_dtype, double_quant, backend))
        del w, b
    own = model.state_dict()
    tensors = {k: v.to(own[k].dtype) for k, v in tensors.items() if k in own} | \
              {k: v for k, v in tensors.items() if k not in own}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    _retie(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left or result.unexpected_keys:
        raise ValueError(f"converted checkpoint does not fit the model: missing {left}, "
                         f"unexpected {result.unexpected_keys}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def memory_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, engine=None) -> dict[str, int]:
    """Bytes held by a model (and its optimizer), each storage counted once (tied weights,
    views), on this rank: a DTensor (FSDP2) by its local shard, a ZeRO-3 `engine`'s rank by its
    shards (ltk/parallel/zero3_memory.py: there the model's own tensors are views of freed storage):

        base_nf4_packed   4-bit codes of the quantized weights (n/2 bytes each)
        base_nf4_stats    their absmax: fp32 (4 bytes a block), or double-quantized codes
                          (1 byte a block) + fp32 scales + offset
        base_full         frozen full-precision parameters and other buffers (embedding,
                          norms, head, frozen biases)
        trainable         parameters that require grad (the LoRA A and B)
        gradients         the .grad tensors present now (after a backward; 0 before)
        optimizer_states  tensors in optimizer.state (AdamW: exp_avg, exp_avg_sq, step), and the
                          fp32 masters of a mixed-precision MasterOptimizer
        total             the sum
    """
    if engine is not None and hasattr(engine, "frozen_bytes"):
        from ltk.parallel.zero3_memory import zero3_breakdown

        return zero3_breakdown(engine, model)
    seen: set = set()
    out = dict(base_nf4_packed=0, base_nf4_stats=0, base_full=0, trainable=0, gradients=0, optimizer_states=0)

    def add(key: str, t: torch.Tensor | None) -> None:
        if isinstance(t, DTensor):  # FSDP2: what this rank holds
            t = t.to_local()
        if t is None or t.numel() == 0 or _storage_key(t) in seen:
            return
        seen.add(_storage_key(t))
        out[key] += t.untyped_storage().nbytes()

    for m in model.modules():
        if isinstance(m, NF4Linear):  # under FSDP2 its integer buffers are frozen parameters (fsdp2.py)
            storage = [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]
            for n, b in storage:
                if n != "bias":
                    add("base_nf4_packed" if n == "packed" else "base_nf4_stats", b)
    params = list(model.parameters())
    for p in params:
        add("trainable" if p.requires_grad else "base_full", p)
    for b in model.buffers():
        add("base_full", b)
    for p in params:
        add("gradients", p.grad)
    if optimizer is not None:
        for m in optimizer.masters() if hasattr(optimizer, "masters") else []:  # mixed precision's fp32 copy
            add("optimizer_states", m)
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    add("optimizer_states", v)
    out["total"] = sum(out.values())
    return out


def quantized_bits_per_param(model: nn.Module) -> float:
    """Measured storage of the quantized linear weights: 8 · (packed + absmax stats bytes) /
    number of weights, over every NF4Linear of the model (biases not included)."""
    n = nbytes = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            n += m.in_features * m.out_features
            nbytes += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    if n == 0:
        raise ValueError("the model has no NF4Linear layers: call quantize_model first")
    return 8 * nbytes / n
