"""Tensor (+ sequence) parallel plans for models.gpt.GPT and models.llama.Llama, applied
from outside: the model files stay single-device (torchtitan's parallelize.py pattern).

    apply_tensor_parallel(model, comm, sequence_parallel=False)   shard the model in place
    tp_loss(model, x, y)                                           mean vocab-parallel CE
    gather_tp_params(model)                                        the unsharded parameters

The plan (Megatron-LM, Shoeybi et al. 2019, §3, figures 3-4), n = tp ranks:

    GPT    attn.c_attn   column, split BY HEADS: the output is [q | k | v], each part split
                         into n so rank r gets heads [r·H/n, (r+1)·H/n) of q, k and v
           attn.c_proj   row            mlp.c_fc  column            mlp.c_proj  row
           wte           vocab-parallel; lm_head (tied to wte) column over the vocabulary,
                         sharing the padded wte shard, so each rank computes its vocab logits
    Llama  wq            column (H/n query heads)
           wk, wv        column (H_kv/n key/value heads: GQA needs H_kv % n == 0, so the
                         query heads of a rank read only key/value heads of the same rank)
           wo row        w1 (gate), w3 (up) column       w2 (down) row
           tok_embeddings vocab-parallel; output (untied) column over the vocabulary

The attention modules compute widths from shapes (GPT splits c_attn's output at C = the input
width, H heads); after sharding those are C/n and H/n. The plan swaps each attention module's
class for a subclass here (same parameters, same names) whose forward reads the local widths,
applies f / f̄ ONCE for q, k, v (and once for Llama's gate and up) — 2 all-reduces forward
and 2 backward per layer, as Megatron — and refuses a KV cache (decoding is out of scope).

Sequence parallel (Korthikanti et al. 2022, §4.2.2): between the column/row regions the
residual stream is (B, T/n, C): the embedding ends in ḡ (reduce-scatter), each region starts
with f̄ (all-gather) and ends with ḡ, and the head starts with f̄. LayerNorm/RMSNorm, dropout
and the residual adds then run on a sequence shard, so the replicated parameters that act
there — norm gains and biases, the biases of row-parallel linears, GPT's position table
(sliced to this rank's positions by _PositionShard) — get only a partial gradient. A hook
on each (tensor.sum_grad_over_tp) all-reduces that gradient over the tp group during
backward, before accumulation: no extra call for the user, right under accumulation.

Dropout: the parity tests run with dropout 0. With dropout on, the masks must agree across
the tp group where activations are replicated and differ where each rank holds other heads or
other sequence positions; Megatron keeps two RNG streams for that (its "RNG tracker"). That is
not implemented here: ranks seeded alike draw the same masks everywhere, which is right in the
replicated regions but correlates the masks of different heads / sequence shards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.kernels.attention import attention
from ltk.kernels.backend import resolve_backend
from ltk.kernels.rope import apply_rope
from ltk.kernels.swiglu import swiglu
from ltk.models.gpt import GPT, CausalSelfAttention
from ltk.models.init import materialize, materialized
from ltk.models.llama import Attention, Llama, SwiGLU
from ltk.parallel.dist import Comm, CommStats
from ltk.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_dim,
    enter_tp_region,
    sum_grad_over_tp,
    vocab_parallel_cross_entropy,
)

_NO_CACHE = "KV-cache decoding is not supported on a tensor-parallel model"


class _TPGPTAttention(CausalSelfAttention):
    """GPT attention on H/n local heads; c_attn is column-parallel by heads."""

    def forward(self, x: torch.Tensor, kv_cache=None, layer: int = 0) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError(_NO_CACHE)
        qkv = self.c_attn(x)  # (B, T, 3·C/n) = [q_r | k_r | v_r]; full T (f̄ gathered it under SP)
        B, T, three_c = qkv.shape
        c, nh = three_c // 3, self.n_head  # n_head is already the local count
        q, k, v = qkv.split(c, dim=2)  # 3 x (B, T, C/n)
        q = q.view(B, T, nh, c // nh).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, c // nh).transpose(1, 2)
        v = v.view(B, T, nh, c // nh).transpose(1, 2)
        p_drop = self.dropout if self.training else 0.0
        if p_drop > 0:
            if resolve_backend(self.backend, x) == "triton":
                raise ValueError("the triton attention kernel has no attention dropout")
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_drop)
        elif self.context_parallel is not None:  # the local heads over the CP group (ltk/parallel/cp_train.py)
            y = self.context_parallel.attention(q, k, v, causal=True, backend=self.backend)
        else:
            y = attention(q, k, v, causal=True, backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, c)  # (B, T, C/n)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C), or (B, T/n, C) under SP


class _TPLlamaAttention(Attention):
    """Llama GQA attention on H/n query and H_kv/n key/value heads; one f / f̄ for q, k, v."""

    def forward(self, x, cos, sin, kv_cache=None, layer: int = 0) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError(_NO_CACHE)
        x = enter_tp_region(x, self.tp_comm, self.sequence_parallel)  # (B, T, d) full sequence
        B, T, _ = x.shape
        # (B, T, heads·D) -> (B, heads, T, D), local head counts
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin, inplace=resolve_backend(self.backend, q) == "triton", backend=self.backend)
        if self.context_parallel is not None:  # the local heads over the CP group (ltk/parallel/cp_train.py)
            y = self.context_parallel.attention(q, k, v, causal=True, backend=self.backend)
        else:
            y = attention(q, k, v, causal=True, backend=self.backend)  # (B, H/n, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H·D/n)
        return self.wo(y)


class _TPSwiGLU(SwiGLU):
    """SwiGLU with gate and up column-parallel behind one f / f̄, down row-parallel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.tp_comm, self.sequence_parallel)
        return self.w2(swiglu(self.w1(x), self.w3(x), backend=self.backend))


class _PositionShard(nn.Module):
    """GPT's learned position table under sequence parallelism: positions (T,) -> the rows of
    this rank's sequence block (T/n, C), to add to the (B, T/n, C) embedding shard."""

    def __init__(self, wpe: nn.Embedding, comm: Comm):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(materialized(wpe.weight).clone())  # replicated; grad summed by hook
        sum_grad_over_tp(self.weight, comm)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if pos.shape[0] % self.comm.size:
            raise ValueError(f"sequence parallel: sequence length {pos.shape[0]} does not split over "
                             f"{self.comm.size} ranks")
        return F.embedding(pos.chunk(self.comm.size)[self.comm.rank], self.weight)  # (T/n, C)


def _sp_norm(norm: nn.Module, comm: Comm, sp: bool) -> None:
    if sp:
        for p in norm.parameters():
            sum_grad_over_tp(p, comm)


def _check_heads(what: str, heads: int, n: int) -> None:
    if heads % n:
        raise ValueError(f"{what}={heads} is not divisible by tp={n}: every rank needs whole heads")


def _plan_gpt(model: GPT, comm: Comm, sp: bool) -> None:
    cfg, n = model.config, comm.size
    _check_heads("model.n_head", cfg.n_head, n)
    C = cfg.n_embd
    for block in model.h:
        a, m = block.attn, block.mlp
        a.__class__ = _TPGPTAttention  # same state, forward on local widths
        a.c_attn = ColumnParallelLinear(a.c_attn, comm, segments=(C, C, C), sequence_parallel=sp)
        a.c_proj = RowParallelLinear(a.c_proj, comm, sequence_parallel=sp)
        a.n_head = cfg.n_head // n
        m.c_fc = ColumnParallelLinear(m.c_fc, comm, sequence_parallel=sp)
        m.c_proj = RowParallelLinear(m.c_proj, comm, sequence_parallel=sp)
        _sp_norm(block.ln_1, comm, sp)
        _sp_norm(block.ln_2, comm, sp)
    _sp_norm(model.ln_f, comm, sp)
    head = ColumnParallelLinear(model.lm_head, comm, pad=True, sequence_parallel=sp)
    model.wte = VocabParallelEmbedding(model.wte, comm, sequence_parallel=sp)
    head.weight = model.wte.weight  # keep the tie: both read the same padded vocab shard
    model.lm_head = head
    if sp:
        model.wpe = _PositionShard(model.wpe, comm)


def _plan_llama(model: Llama, comm: Comm, sp: bool) -> None:
    cfg, n = model.config, comm.size
    _check_heads("model.n_head", cfg.n_head, n)
    _check_heads("model.n_kv_head", cfg.n_kv_head, n)
    for block in model.layers:
        a, m = block.attn, block.mlp
        a.__class__, m.__class__ = _TPLlamaAttention, _TPSwiGLU
        for mod in (a, m):
            mod.tp_comm, mod.sequence_parallel = comm, sp
        a.wq, a.wk, a.wv = (ColumnParallelLinear(lin, comm, input_comm=False) for lin in (a.wq, a.wk, a.wv))
        a.wo = RowParallelLinear(a.wo, comm, sequence_parallel=sp)
        a.n_head, a.n_kv_head = cfg.n_head // n, cfg.n_kv_head // n
        m.w1, m.w3 = (ColumnParallelLinear(lin, comm, input_comm=False) for lin in (m.w1, m.w3))
        m.w2 = RowParallelLinear(m.w2, comm, sequence_parallel=sp)
        _sp_norm(block.attn_norm, comm, sp)
        _sp_norm(block.mlp_norm, comm, sp)
    _sp_norm(model.norm, comm, sp)
    head = ColumnParallelLinear(model.output, comm, pad=True, sequence_parallel=sp)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, comm, sequence_parallel=sp)
    if cfg.tie_embeddings:
        head.weight = model.tok_embeddings.weight
    model.output = head


def apply_tensor_parallel(model: nn.Module, comm: Comm, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (GPT or Llama, built identically on every rank of `comm`, whole or with its
    parameters on the meta device: ltk/models/init.py) in place and return it. Its forward then
    returns this rank's vocab logits (B, T, V_local) — use tp_loss for the loss; parameter names
    stay those of the single-device model."""
    if getattr(model, "tp_comm", None) is not None:
        raise ValueError("the model is already tensor-parallel")
    if isinstance(model, GPT):
        _plan_gpt(model, comm, sequence_parallel)
    elif isinstance(model, Llama):
        _plan_llama(model, comm, sequence_parallel)
    else:
        raise TypeError(f"no tensor-parallel plan for {type(model).__name__}: GPT and Llama have one")
    materialize(model)  # what the plan replicates (norms, positions), where the model was built on meta
    model.tp_comm, model.sequence_parallel = comm, sequence_parallel
    return model


def _head(model: nn.Module) -> ColumnParallelLinear:
    if getattr(model, "tp_comm", None) is None:
        raise ValueError("the model is not tensor-parallel: call apply_tensor_parallel first")
    return model.lm_head if isinstance(model, GPT) else model.output


def tp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a tensor-parallel model over (B, T) tokens, from the
    local vocab logits (never gathered); the same value on every tp rank."""
    head = _head(model)
    logits = model(x)[..., :head.n_valid]  # (B, T, V_r): padded columns sliced off
    loss = vocab_parallel_cross_entropy(logits.flatten(0, 1), y.flatten(), head.vocab_start, model.tp_comm)
    return loss.mean()


def _unshard(mod: nn.Module, comm: Comm) -> dict[str, torch.Tensor]:
    """The full weight (and bias) of a sharded layer, as the original module held them."""
    if isinstance(mod, RowParallelLinear):
        out = {"weight": all_gather_dim(mod.weight.detach(), comm, 1)}  # (out, in)
        if mod.bias is not None:
            out["bias"] = mod.bias.detach().clone()
        return out
    if isinstance(mod, VocabParallelEmbedding):
        return {"weight": all_gather_dim(mod.weight.detach(), comm, 0)[:mod.num_embeddings]}  # (V, C)
    out = {}
    for name in ("weight", "bias"):  # ColumnParallelLinear
        p = getattr(mod, name)
        if p is None:
            continue
        g = all_gather_dim(p.detach(), comm, 0).view(comm.size, *p.shape)  # (n, out_local, ...)
        if len(mod.segments) == 1:
            out[name] = g.flatten(0, 1)[:mod.out_features]  # drop the vocabulary padding
        else:  # rank r holds piece r of every segment: regroup them segment by segment
            parts = g.split([s // comm.size for s in mod.segments], dim=1)
            out[name] = torch.cat([q.flatten(0, 1) for q in parts])
    return out


@torch.no_grad()
def gather_tp_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter at full size under its single-device name (collective: every tp rank
    calls it). Its all-gathers are counted apart, not in parallel.dist.STATS."""
    _head(model)
    quiet = Comm(model.tp_comm.group, stats=CommStats())
    out: dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            for pname, t in _unshard(mod, quiet).items():
                out[f"{mname}.{pname}"] = t
    # named_parameters lists a tied weight once, under its first name (GPT: wte.weight)
    return {name: out[name] if name in out else p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def gather_tp_like(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unshard tensors shaped like this rank's parameters (Adam's moments, by parameter name),
    each exactly as its parameter is unsharded; a replicated parameter's tensor is returned as
    it is. Collective over the tp group."""
    quiet = Comm(model.tp_comm.group, stats=CommStats())
    owner: dict[int, tuple[nn.Module, str]] = {}
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            for attr in ("weight", "bias"):
                if getattr(mod, attr, None) is not None:
                    owner[id(getattr(mod, attr))] = (mod, attr)
    out = {}
    for name, p in model.named_parameters():
        if name not in tensors:
            continue
        if id(p) not in owner:
            out[name] = tensors[name].clone()
            continue
        mod, attr = owner[id(p)]
        kept, p.data = p.data, tensors[name]  # unshard the tensor through the parameter's own layout
        try:
            out[name] = _unshard(mod, quiet)[attr]
        finally:
            p.data = kept
    return out


@torch.no_grad()
def shard_tp_like(build: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], comm: Comm,
                  sequence_parallel: bool = False) -> dict[str, torch.Tensor]:
    """The inverse: full-size tensors by parameter name -> this rank's shards, cut by applying the
    plan to a scratch model whose parameters hold them (no communication)."""
    scratch = build()
    params = dict(scratch.named_parameters())
    for name, t in tensors.items():
        params[name].data = t.to(params[name].dtype).clone()
    apply_tensor_parallel(scratch, Comm(comm.group, stats=CommStats()), sequence_parallel)
    return {n: p.detach() for n, p in scratch.named_parameters() if n in tensors}


def split_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters this plan splits over the tp ranks (the others are replicated)."""
    out = set()
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            out |= {id(p) for p in mod.parameters(recurse=False)}
        elif isinstance(mod, RowParallelLinear):
            out.add(id(mod.weight))  # its bias is added once, after the reduction: replicated
    return out
