"""PyTorch's DTensor tensor parallelism for models.gpt.GPT and models.llama.Llama:
`parallelize_module` with ColwiseParallel / RowwiseParallel, the plan of ltk/parallel/tp_plan.py
(Megatron-LM, Shoeybi et al. 2019 §3) written in torch's styles, applied from outside:

    GPT    attn.c_attn  Colwise (by heads: see below)    attn.c_proj  Rowwise
           mlp.c_fc     Colwise                          mlp.c_proj   Rowwise
           wte          Rowwise (vocab rows; the output all-reduced)
           lm_head      Colwise over the vocabulary, output Shard(-1) kept local; tied to wte
    Llama  wq, wk, wv   Colwise (H/n query, H_kv/n key/value heads)    wo Rowwise
           w1, w3       Colwise                                        w2 Rowwise
           tok_embeddings Rowwise; output Colwise, output Shard(-1) kept local
    norms, GPT's position table: plain replicated tensors (every rank computes them alike)

Heads. Colwise gives rank r the rows [r·R/n, (r+1)·R/n) of a weight of R rows. GPT fuses q, k, v in
one c_attn of 3C rows, [q | k | v]: contiguous blocks would give rank 0 all of q. So its rows are
stored head-major — [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], piece r of each of q, k, v next to each other
(`head_major`) — and the DTensor's global tensor is that permutation of the single-process one.
Checkpoint boxes and state dicts map rows back (`single_rows`, `to_single_layout`), so every reader
sees the single-process layout. The attention module's class becomes tp_plan's _TPGPTAttention (same
parameters; its forward reads the local widths and holds no collective); Llama's Attention reads its
head counts from attributes, which are set to the local counts.

Loss: the head's output stays this rank's vocabulary slice (B, T, V_r) and the cross-entropy is
Megatron's vocab-parallel one (tp_plan.tp_loss, ltk/parallel/tensor.py) — what torch's
`loss_parallel` computes, without its requirement that the backward run inside its context, which
the training loop does not do. The full logits are never gathered; evaluation scores from the
slice too (sharded_eval.tp_eval_sums). For that the head gets tp_plan's attributes (vocab_start,
n_valid) and the model tp_comm.

Sequence parallelism is not offered here: GPT's and Llama's blocks fuse the residual add into the
next norm (norm(x, delta) -> (y, h)), two inputs and two outputs where torch's SequenceParallel
style takes one; our own plan (`--parallel tp --parallel.sequence_parallel true`) has it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ltk.models.gpt import GPT
from ltk.models.llama import Llama
from ltk.parallel.dist import Comm
from ltk.parallel.fsdp2 import local_part
from ltk.parallel.tp_plan import _check_heads, _TPGPTAttention


def head_major(t: torch.Tensor, segments: int, n: int) -> torch.Tensor:
    """Rows [s_0 | s_1 | ...] of `segments` equal segments -> piece r of every segment together,
    rank by rank: (segments·m, ...) -> (n, segments, m/n, ...) order."""
    rest = t.shape[1:]
    m = t.shape[0] // segments
    return t.reshape(segments, n, m // n, *rest).transpose(0, 1).reshape(t.shape)


def from_head_major(t: torch.Tensor, segments: int, n: int) -> torch.Tensor:
    rest = t.shape[1:]
    m = t.shape[0] // segments
    return t.reshape(n, segments, m // n, *rest).transpose(0, 1).reshape(t.shape)


def single_rows(model: nn.Module, name: str, a: int, b: int) -> list[tuple[int, int, int]]:
    """Rows [a, b) of parameter `name` in its DTensor layout as runs of single-process rows:
    [(start within [a, b), single-process start, length)]."""
    layout = getattr(model, "_ltk_head_major", {}).get(name)
    if layout is None:
        return [(0, a, b - a)] if b > a else []
    segments, n, rows = layout
    k = rows // segments // n  # one segment's piece on one rank
    out, i = [], a
    while i < b:
        r, j = divmod(i, segments * k)  # rank block r, row j in it
        s, w = divmod(j, k)
        length = min(k - w, b - i)
        out.append((i - a, s * (rows // segments) + r * k + w, length))
        i += length
    return out


def to_single_layout(model: nn.Module, name: str, full: torch.Tensor) -> torch.Tensor:
    layout = getattr(model, "_ltk_head_major", {}).get(name)
    return full if layout is None else from_head_major(full, layout[0], layout[1])


def to_dtensor_layout(model: nn.Module, name: str, full: torch.Tensor) -> torch.Tensor:
    layout = getattr(model, "_ltk_head_major", {}).get(name)
    return full if layout is None else head_major(full, layout[0], layout[1])


def _colwise_head(**kw) -> ColwiseParallel:
    return ColwiseParallel(output_layouts=Shard(-1), use_local_output=True, **kw)


def _plan_gpt(model: GPT, mesh) -> dict[str, object]:
    cfg, n = model.config, mesh.size()
    _check_heads("model.n_head", cfg.n_head, n)
    model._ltk_head_major = {}
    for i, block in enumerate(model.h):
        a = block.attn
        a.__class__ = _TPGPTAttention  # same parameters, forward on the local widths
        a.n_head = cfg.n_head // n
        for pname, p in a.c_attn.named_parameters():
            model._ltk_head_major[f"h.{i}.attn.c_attn.{pname}"] = (3, n, p.shape[0])
            if not p.is_meta:
                p.data = head_major(p.data, 3, n)
        parallelize_module(block, mesh, {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
                                         "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()})
    parallelize_module(model, mesh, {"wte": RowwiseParallel(input_layouts=Replicate()), "lm_head": _colwise_head()})
    model.lm_head.weight = model.wte.weight  # keep the tie: both read the same vocabulary rows
    return model.lm_head


def _plan_llama(model: Llama, mesh) -> dict[str, object]:
    cfg, n = model.config, mesh.size()
    _check_heads("model.n_head", cfg.n_head, n)
    _check_heads("model.n_kv_head", cfg.n_kv_head, n)
    for block in model.layers:
        block.attn.n_head, block.attn.n_kv_head = cfg.n_head // n, cfg.n_kv_head // n
        parallelize_module(block, mesh, {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
                                         "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
                                         "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
                                         "mlp.w2": RowwiseParallel()})
    parallelize_module(model, mesh, {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
                                     "output": _colwise_head()})
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.output


def apply_torch_tp(model: nn.Module, mesh) -> nn.Module:
    """Parallelize GPT or Llama (whole, or with parameters on the meta device) over the 1-D
    DeviceMesh `mesh` in place; its forward then returns this rank's vocabulary slice of the
    logits, and tp_plan.tp_loss / tp_eval_sums score it."""
    if isinstance(model, GPT):
        head = _plan_gpt(model, mesh)
    elif isinstance(model, Llama):
        head = _plan_llama(model, mesh)
    else:
        raise TypeError(f"no DTensor tensor-parallel plan for {type(model).__name__}: GPT and Llama have one")
    shape, offset = local_part(head.weight)
    head.vocab_start, head.n_valid = offset[0], shape[0]  # what tp_plan's loss and evaluation read
    model.tp_comm, model.sequence_parallel = Comm(mesh.get_group()), False
    return model
