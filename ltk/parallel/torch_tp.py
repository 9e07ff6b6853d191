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

Sequence parallelism (`sequence_parallel=True`, Korthikanti et al. 2022 §4.2.2; torch-tp, fsdp2 x tp):
between the attention and MLP sub-layers the residual stream, the norms and the residual adds run
on this rank's T/n positions, as in our plan (tp_plan.py). torch's SequenceParallel style takes a
norm with one input, and our blocks fuse the residual add into the next norm (norm(x, delta) ->
(y, h), two inputs and two outputs), so the norms stay plain modules on plain local tensors and
the layouts are set around them instead, torchtitan's way:

    attn, mlp            a pre-hook: Shard(1) -> Replicate DTensor (an all-gather over the
                         sequence before the column-parallel matmuls; one reduce-scatter of
                         their summed input gradients)
    c_proj, wo, w2       RowwiseParallel with output Shard(1): a reduce-scatter instead of the
                         all-reduce, leaving each rank its positions
    wte / tok_embeddings RowwiseParallel with output Shard(1); GPT's position rows are cut to
                         this rank's positions by a forward hook on wpe
    lm_head / output     ColwiseParallel with input Shard(1) (gathers the sequence for the head)

Each rank then computes the gradient of a plain replicated parameter (norms, GPT's wpe) from its
own positions only, so it must be summed over the tensor-parallel group, d w = Σ_ranks d w_r.
That sum lives in the autograd graph, not on the parameter: while the module that owns the
parameter runs, the tensor its forward reads is Megatron's f applied to it (identity forward,
all-reduce over tp in the backward, tensor._CopyToTP), so the gradient that reaches the parameter
is already the sum. A hook on the parameter itself would be lost under FSDP2, which computes with
unsharded copies it makes per step (fsdp2 x tp: the norms are sharded over dp, plain over tp); the
graph sees whatever tensor the module holds when it runs, FSDP2's copy included, and the dp
reduce-scatter then averages sums that are already whole. One all-reduce of the parameter's
size per micro-batch, as our tp_plan's hooks (tensor.sum_grad_over_tp).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ltk.models.gpt import GPT
from ltk.models.llama import Llama
from ltk.parallel.dist import Comm
from ltk.parallel.fsdp2 import local_part
from ltk.parallel.tensor import _CopyToTP
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


def _colwise_head(sp: bool = False) -> ColwiseParallel:
    return ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                           use_local_output=True)


def _gather_sequence(mesh):
    """A forward pre-hook: a sub-layer's first input, this rank's positions (Shard(1)), becomes a
    Replicate DTensor of every position — an all-gather — which the sub-layer hands to its
    column-parallel matmuls as it is (it reads only its shape). Their input gradients arrive as
    partial sums (each rank's columns), so the backward of this redistribution is one
    reduce-scatter, torchtitan's arrangement; turned into a local tensor here instead, each
    matmul would all-reduce its own gradient. The other arguments (GPT's kv_cache and layer,
    Llama's cos and sin) pass through."""

    def hook(module, args):
        x = DTensor.from_local(args[0], mesh, [Shard(1)], run_check=False)
        return (x.redistribute(mesh, [Replicate()]),) + tuple(args[1:])

    return hook


def _parallelize_block(block: nn.Module, mesh, sp: bool, attn: tuple[str, ...], attn_out: str,
                       up: tuple[str, ...], down: str) -> None:
    """The Megatron split of one block, with the sequence-parallel layouts around it when sp."""
    plan = {f"attn.{n}": ColwiseParallel() for n in attn} | {f"mlp.{n}": ColwiseParallel() for n in up}
    out = Shard(1) if sp else Replicate()
    plan |= {f"attn.{attn_out}": RowwiseParallel(output_layouts=out),
             f"mlp.{down}": RowwiseParallel(output_layouts=out)}
    parallelize_module(block, mesh, plan)
    if sp:
        block.attn.register_forward_pre_hook(_gather_sequence(mesh))
        block.mlp.register_forward_pre_hook(_gather_sequence(mesh))


def sum_plain_grads_over_tp(model: nn.Module, mesh) -> None:
    """Sequence parallelism: every plain (non-DTensor) parameter reaches its module's forward as
    f(p) (tensor._CopyToTP: identity, gradient all-reduced over tp), so its gradient is the sum
    over the group's positions (module docstring). Call after parallelize_module and before
    fully_shard, while "plain over tp" is still readable from the parameters' types; the hooks sit
    on the modules, so they outlive meta materialization and FSDP2's parameter swaps."""
    comm = Comm(mesh.get_group())
    for mod in model.modules():
        names = [n for n, p in mod.named_parameters(recurse=False) if not isinstance(p, DTensor) and p.requires_grad]
        if names:
            saved: dict[str, torch.Tensor] = {}
            mod.register_forward_pre_hook(_wrap_params(names, comm, saved))
            mod.register_forward_hook(_restore_params(saved), always_call=True)


def _wrap_params(names: list[str], comm: Comm, saved: dict):
    def hook(module, args):
        for n in names:
            saved[n] = p = module._parameters[n]
            module._parameters[n] = _CopyToTP.apply(p, comm)  # read as f(p) until the forward returns
    return hook


def _restore_params(saved: dict):
    def hook(module, args, out):
        module._parameters.update(saved)
        saved.clear()
    return hook


def _positions_of_this_rank(mesh):
    """A forward hook cutting a (T, C) or (B, T, C) position table's output to this rank's T/n."""
    n, r = mesh.size(), mesh.get_local_rank()

    def hook(module, args, out):
        T = out.shape[-2]
        if T % n:
            raise ValueError(f"sequence parallelism splits the {T} positions over {n} ranks: use a multiple of {n}")
        return out.narrow(-2, r * (T // n), T // n)

    return hook


def _plan_gpt(model: GPT, mesh, sp: bool) -> nn.Module:
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
        _parallelize_block(block, mesh, sp, ("c_attn",), "c_proj", ("c_fc",), "c_proj")
    parallelize_module(model, mesh, {"wte": RowwiseParallel(input_layouts=Replicate(),
                                                            output_layouts=Shard(1) if sp else Replicate()),
                                     "lm_head": _colwise_head(sp)})
    model.lm_head.weight = model.wte.weight  # keep the tie: both read the same vocabulary rows
    if sp:
        model.wpe.register_forward_hook(_positions_of_this_rank(mesh))
    return model.lm_head


def _plan_llama(model: Llama, mesh, sp: bool) -> nn.Module:
    cfg, n = model.config, mesh.size()
    _check_heads("model.n_head", cfg.n_head, n)
    _check_heads("model.n_kv_head", cfg.n_kv_head, n)
    for block in model.layers:
        block.attn.n_head, block.attn.n_kv_head = cfg.n_head // n, cfg.n_kv_head // n
        _parallelize_block(block, mesh, sp, ("wq", "wk", "wv"), "wo", ("w1", "w3"), "w2")
    parallelize_module(model, mesh, {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(),
                                                                       output_layouts=Shard(1) if sp else Replicate()),
                                     "output": _colwise_head(sp)})
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.output


def apply_torch_tp(model: nn.Module, mesh, sequence_parallel: bool = False) -> nn.Module:
    """Parallelize GPT or Llama (whole, or with parameters on the meta device) over the 1-D
    DeviceMesh `mesh` in place; its forward then returns this rank's vocabulary slice of the
    logits, and tp_plan.tp_loss / tp_eval_sums score it. With sequence_parallel the plain
    parameters' gradients are summed over the group in the graph (sum_plain_grads_over_tp)."""
    if isinstance(model, GPT):
        head = _plan_gpt(model, mesh, sequence_parallel)
    elif isinstance(model, Llama):
        head = _plan_llama(model, mesh, sequence_parallel)
    else:
        raise TypeError(f"no DTensor tensor-parallel plan for {type(model).__name__}: GPT and Llama have one")
    if sequence_parallel:
        sum_plain_grads_over_tp(model, mesh)
    shape, offset = local_part(head.weight)
    head.vocab_start, head.n_valid = offset[0], shape[0]  # what tp_plan's loss and evaluation read
    # sequence_parallel stays False for tp_plan's loss and evaluation: the head's input is gathered
    # here (its ColwiseParallel), so its logits cover every position, as without it
    model.tp_comm, model.sequence_parallel = Comm(mesh.get_group()), False
    return model
