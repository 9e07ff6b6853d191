"""Tensor parallelism (Megatron-LM) and sequence parallelism, the layers: conjugate
communication operators, column/row-parallel linears, a vocab-parallel embedding and a
vocab-parallel cross-entropy. ltk/parallel/tp_plan.py applies them to the models from outside.

Megatron-LM (Shoeybi et al. 2019, arXiv 1909.08053, §3, figures 3-4). A matmul Y = X A over
n ranks, A split two ways (nn.Linear stores Aᵀ, so "columns of A" are rows of `weight`):

    column-parallel   A = [A_1 | ... | A_n]       rank r: Y_r = X A_r          (output split)
    row-parallel      A = [A_1; ...; A_n], X = [X_1 | ... | X_n]
                                                  rank r: Y = Σ_r X_r A_r      (sum over ranks)

A transformer MLP is column then row: Z = GeLU(X A) B needs one sum, and the nonlinearity
acts on the local columns only; attention is the same with whole heads per rank. Two
conjugate operators put the communication at the edges of such a region:

    f   forward identity      backward all-reduce   (enter: X is replicated, dX is a sum)
    g   forward all-reduce    backward identity     (leave: Σ_r X_r A_r)

Sequence parallelism (Korthikanti et al. 2022, arXiv 2205.05198, §4.2.2, figure 5): outside
those regions (LayerNorm, dropout, residual adds) the activations are split along the
sequence instead of replicated, and each all-reduce becomes a reduce-scatter plus an
all-gather of the same payload (same ring wire bytes, 1/n of the activation memory):

    ḡ   forward reduce-scatter along the sequence, backward all-gather     (replaces g)
    f̄   forward all-gather along the sequence, backward reduce-scatter     (replaces f)

Activations are (B, T, C): the sequence dim is dim 1, moved to the front for the collective
so that every rank's block is contiguous. T must divide by n.

Vocabulary (Megatron §3, "input embedding"): the embedding table E (V, C) is split by rows;
rank r owns ids [r·V_r, r·V_r + V_r), looks up the ids it owns, zeroes the others, and g
sums the parts. A vocabulary that n does not divide is PADDED to n·ceil(V / n) with zero
rows at the end (Megatron pads too); the padded logits never reach the loss (tp_plan slices
them off) and their rows get zero gradient, so they stay zero under AdamW.

Vocab-parallel cross-entropy, for logits z (N, V) of which rank r holds the columns V_r:

    M = max_j z_j                  all-reduce MAX of the local maxima
    S = Σ_j exp(z_j − M)           all-reduce SUM of the local sums
    z_t − M                        all-reduce SUM (only the rank owning target t contributes)
    loss = log S − (z_t − M)
    ∂loss/∂z_j = softmax_j − 1[j = t]     on the local columns only: no gather, ever

so the (N, V) logits never exist on one rank: 3 all-reduces of N fp32 numbers instead.

Every collective goes through a parallel.dist.Comm, so a step's bytes can be counted.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.models.init import materialized
from ltk.parallel.dist import Comm

SEQ_DIM = 1  # activations are (B, T, C)


# -- collectives along one dim ------------------------------------------------------------------
def all_gather_dim(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    """(..., k, ...) -> (..., n·k, ...), rank blocks in rank order along `dim`."""
    front = x.movedim(dim, 0).contiguous()  # (k, ...)
    out = front.new_empty((comm.size * front.shape[0],) + front.shape[1:])  # (n·k, ...)
    comm.all_gather(out, front)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    """(..., n·k, ...) summed over ranks -> this rank's block (..., k, ...)."""
    if x.shape[dim] % comm.size:
        raise ValueError(f"sequence parallel: dim {dim} of size {x.shape[dim]} does not split over "
                         f"{comm.size} tensor-parallel ranks")
    front = x.movedim(dim, 0).contiguous()  # (n·k, ...)
    out = front.new_empty((front.shape[0] // comm.size,) + front.shape[1:])  # (k, ...)
    comm.reduce_scatter(out, front)
    return out.movedim(0, dim)


def _split_dim(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    return x.chunk(comm.size, dim=dim)[comm.rank].contiguous()


# -- the conjugate operators ---------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):  # f
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # the engine may still hold grad: reduce a copy
        ctx.comm.all_reduce(grad)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):  # g
    @staticmethod
    def forward(ctx, x, comm):
        out = x.contiguous().clone()
        comm.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceScatterToSP(torch.autograd.Function):  # ḡ
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _reduce_scatter_dim(x, comm, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, ctx.comm, SEQ_DIM), None


class _GatherFromSP(torch.autograd.Function):  # f̄
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return all_gather_dim(x, comm, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim(grad, ctx.comm, SEQ_DIM), None


class _GatherLastDim(torch.autograd.Function):  # column-parallel gather_output
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return all_gather_dim(x, comm, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split_dim(grad, ctx.comm, -1), None  # every rank already has the whole dY


class _ColumnLinear(torch.autograd.Function):
    """f (or f̄) fused with the column-parallel matmul Y = X A_r + b_r, so that the backward can
    overlap what is independent (Megatron-LM's async tensor-model-parallel all-reduce, Narayanan
    et al. 2021 §4.3 "communication optimizations"; torch's LinearWithAsyncCommunication):

        dX = dY A_rᵀ           then launch all-reduce(dX) async     (f̄: reduce-scatter along T)
        dA_r = Xᵀ dY, db_r     computed while dX travels
        wait                   dX is the sum over ranks

    The same products, in the same formulas as autograd's linear backward (addmm on (B·T, C)
    views), and the same collective on the same tensor: results are bit-identical to f followed
    by F.linear. Under f̄ the gathered input (B, T, C) is what is saved, as F.linear would."""

    @staticmethod
    def forward(ctx, x, weight, bias, comm, sequence_parallel):
        x = all_gather_dim(x, comm, SEQ_DIM) if sequence_parallel else x  # f̄: (B, T/n, C) -> (B, T, C)
        ctx.save_for_backward(x, weight)
        ctx.comm, ctx.sp, ctx.has_bias = comm, sequence_parallel, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (B·T, out_r)
        x2 = x.reshape(-1, x.shape[-1])  # (B·T, C)
        dx = g2.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None  # (B, T, C)
        if dx is None:  # a frozen input: f would not have run either
            out, handle = None, None
        elif ctx.sp:  # f̄'s backward: reduce-scatter along the sequence, this rank's block out
            front = dx.movedim(SEQ_DIM, 0).contiguous()  # (T, B, C)
            out = front.new_empty((front.shape[0] // ctx.comm.size,) + front.shape[1:])  # (T/n, B, C)
            handle = ctx.comm.reduce_scatter(out, front, async_op=True)
        else:
            out, handle = dx, ctx.comm.all_reduce(dx, async_op=True)
        dw = x2.t().mm(g2).t() if ctx.needs_input_grad[1] else None  # (out_r, C), as addmm's backward
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if handle is not None:
            handle.wait()
        dx = out.movedim(0, SEQ_DIM) if ctx.sp and out is not None else out
        return dx, dw, db, None, None


copy_to_tp = _CopyToTP.apply  # f(x, comm)
reduce_from_tp = _ReduceFromTP.apply  # g(x, comm)
reduce_scatter_to_sp = _ReduceScatterToSP.apply  # ḡ(x, comm)
gather_from_sp = _GatherFromSP.apply  # f̄(x, comm)


def enter_tp_region(x: torch.Tensor, comm: Comm, sequence_parallel: bool) -> torch.Tensor:
    """The input side of a column-parallel region: f, or f̄ under sequence parallelism."""
    return gather_from_sp(x, comm) if sequence_parallel else copy_to_tp(x, comm)


def leave_tp_region(x: torch.Tensor, comm: Comm, sequence_parallel: bool) -> torch.Tensor:
    """The output side of a row-parallel region: g, or ḡ under sequence parallelism."""
    return reduce_scatter_to_sp(x, comm) if sequence_parallel else reduce_from_tp(x, comm)


def sum_grad_over_tp(param: nn.Parameter, comm: Comm) -> None:
    """Make `param`'s gradient the sum over the tensor-parallel group. For a replicated
    parameter that, under sequence parallelism, sees only this rank's sequence shard (norm
    gains, a bias added after ḡ, position embeddings): each rank's gradient is a partial
    sum over its tokens. The hook reduces each incoming gradient before it is accumulated,
    so it stays right under gradient accumulation; one all-reduce per micro-batch.

    A parameter still on the meta device is made real first: making it real later swaps the
    tensor under the Python object (ltk/models/init.py make_real), and a hook registered before
    the swap would never fire — each rank would step on its partial sum alone."""
    if param.is_meta:
        from ltk.models.init import make_real, materialized

        make_real(param, materialized(param))

    def hook(grad):
        grad = grad.contiguous().clone()
        comm.all_reduce(grad)
        return grad

    param.register_hook(hook)


def vocab_shard(vocab: int, comm: Comm) -> tuple[int, int, int]:
    """(start, padded local rows, real local rows) of this rank's slice of a vocabulary
    padded to n·ceil(V / n)."""
    local = math.ceil(vocab / comm.size)
    if (comm.size - 1) * local >= vocab:  # checked alike on every rank: none raises alone
        raise ValueError(f"vocabulary of {vocab} is too small to split over {comm.size} ranks "
                         f"(the last rank would own no ids)")
    start = comm.rank * local
    return start, local, min(local, vocab - start)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros((rows - w.shape[0],) + w.shape[1:])]) if rows > w.shape[0] else w


# -- layers ---------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """Y_r = X A_r + b_r: this rank's output features (Megatron figure 3a, the A of the MLP).

    Built from a full nn.Linear by slicing its weight rows. `segments`: the output is a
    concatenation of parts that must each be split (GPT's c_attn is [q | k | v], sizes
    (C, C, C)): rank r gets the r-th piece of every part, concatenated, so it holds whole
    heads of q, k and v. `pad`: split one segment into n·ceil(out / n) rows, zero-padded at
    the end (the vocabulary head: its real features on this rank are [vocab_start,
    vocab_start + n_valid)). `input_comm=False` when the caller already applied f / f̄ once
    for several linears reading the same input (Llama's q, k, v; gate and up).
    """

    def __init__(self, linear: nn.Linear, comm: Comm, *, segments: tuple[int, ...] | None = None,
                 gather_output: bool = False, sequence_parallel: bool = False, input_comm: bool = True,
                 pad: bool = False):
        super().__init__()
        out, n, r = linear.out_features, comm.size, comm.rank
        segments = tuple(segments or (out,))
        if sum(segments) != out:
            raise ValueError(f"segments {segments} do not add up to the {out} output features")
        if pad and len(segments) > 1:
            raise ValueError("pad=True splits a single segment (a vocabulary head)")
        self.comm, self.gather_output, self.sequence_parallel = comm, gather_output, sequence_parallel
        self.input_comm, self.out_features, self.segments = input_comm, out, segments
        # a meta parameter (a model built shard by shard, ltk/models/init.py) is made whole here, cut, freed
        w, b = materialized(linear.weight), None if linear.bias is None else materialized(linear.bias)
        if pad:
            self.vocab_start, local, self.n_valid = vocab_shard(out, comm)
            rows = slice(self.vocab_start, self.vocab_start + self.n_valid)
            w_r = _pad_rows(w[rows], local)
            b_r = None if b is None else _pad_rows(b[rows], local)
        else:
            bad = [s for s in segments if s % n]
            if bad:
                raise ValueError(f"output features {segments} must each divide by tp={n} (got {bad})")
            starts = [sum(segments[:i]) + r * (s // n) for i, s in enumerate(segments)]
            idx = torch.cat([torch.arange(st, st + s // n) for st, s in zip(starts, segments)])
            w_r, b_r = w[idx], None if b is None else b[idx]
            self.vocab_start, self.n_valid = r * (out // n), out // n
        self.weight = nn.Parameter(w_r.clone())
        self.bias = None if b_r is None else nn.Parameter(b_r.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_comm and x.dim() >= 2 and torch.is_grad_enabled():
            # f / f̄ fused with the matmul: dX's collective overlaps the weight-gradient GEMM
            y = _ColumnLinear.apply(x, self.weight, self.bias, self.comm, self.sequence_parallel)
        else:
            if self.input_comm:
                x = enter_tp_region(x, self.comm, self.sequence_parallel)
            y = F.linear(x, self.weight, self.bias)  # (B, T, out_local)
        if not self.gather_output:
            return y
        if len(self.segments) > 1:
            raise ValueError("gather_output of a segmented column-parallel linear would interleave the segments")
        return _GatherLastDim.apply(y, self.comm)[..., :self.out_features]  # drop the padding

    def extra_repr(self) -> str:
        return f"{self.out_features} out -> local {tuple(self.weight.shape)}, sp={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """Y = g(Σ_r X_r A_r) + b: the input is already split by features (Megatron figure 3a,
    the B of the MLP). The bias is replicated and added once, after the reduction."""

    def __init__(self, linear: nn.Linear, comm: Comm, *, sequence_parallel: bool = False):
        super().__init__()
        n, r = comm.size, comm.rank
        if linear.in_features % n:
            raise ValueError(f"input features {linear.in_features} must divide by tp={n}")
        k = linear.in_features // n
        self.comm, self.sequence_parallel, self.in_features = comm, sequence_parallel, linear.in_features
        self.weight = nn.Parameter(materialized(linear.weight)[:, r * k:(r + 1) * k].clone())
        self.bias = None if linear.bias is None else nn.Parameter(materialized(linear.bias).clone())
        if self.bias is not None and sequence_parallel:
            sum_grad_over_tp(self.bias, comm)  # added to a sequence shard only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tp_region(F.linear(x, self.weight), self.comm, self.sequence_parallel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} in -> local {tuple(self.weight.shape)}, sp={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """E split by rows over ranks (vocabulary padded to n·ceil(V/n)); ids this rank does not
    own look up nothing (zero rows), then g sums the parts — or ḡ, under sequence parallelism,
    which also leaves each rank its block of the sequence."""

    def __init__(self, emb: nn.Embedding, comm: Comm, *, sequence_parallel: bool = False):
        super().__init__()
        self.comm, self.sequence_parallel, self.num_embeddings = comm, sequence_parallel, emb.num_embeddings
        self.vocab_start, local, self.n_valid = vocab_shard(emb.num_embeddings, comm)
        w = materialized(emb.weight)[self.vocab_start:self.vocab_start + self.n_valid]
        self.weight = nn.Parameter(_pad_rows(w, local).clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        foreign = (local < 0) | (local >= self.n_valid)
        out = F.embedding(local.masked_fill(foreign, 0), self.weight)  # (B, T, C)
        out = out.masked_fill(foreign[..., None], 0.0)
        return leave_tp_region(out, self.comm, self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} ids -> local {tuple(self.weight.shape)}, sp={self.sequence_parallel}"


# -- vocab-parallel cross-entropy -------------------------------------------------------------------
class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, comm):
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (N, V_r); at least fp32
        m = z.max(dim=-1).values  # (N,)
        comm.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
        z = z - m[:, None]
        local_t = target - vocab_start
        mine = (local_t >= 0) & (local_t < z.shape[-1])  # this rank owns the target column
        idx = local_t.clamp(0, z.shape[-1] - 1)
        z_t = z.gather(1, idx[:, None]).squeeze(1).masked_fill(~mine, 0.0)  # (N,)
        comm.all_reduce(z_t)
        e = z.exp()
        s = e.sum(dim=-1)  # (N,)
        comm.all_reduce(s)
        ctx.save_for_backward(e / s[:, None], idx, mine)
        ctx.logits_dtype = logits.dtype
        return s.log() - z_t

    @staticmethod
    def backward(ctx, grad):
        p, idx, mine = ctx.saved_tensors  # softmax of the local columns
        g = p.scatter_add(1, idx[:, None], -mine.to(p.dtype)[:, None])  # softmax - onehot
        return (g * grad[:, None]).to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 comm: Comm) -> torch.Tensor:
    """Per-token loss −log softmax(z)_t from this rank's columns z[:, vocab_start : vocab_start
    + V_r] of the logits. logits (N, V_r), target (N,) global ids -> (N,) in fp32 (fp64 for
    fp64 logits), the same on every rank. Slice padded columns off first: they would join
    the softmax."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V_local) and target (N,), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, comm)
