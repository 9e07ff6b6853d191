"""Fused linear cross-entropy: the loss CE(h·Wᵀ + b, y) without the (N, V) logits.

The LM head's logits are the largest tensor of a training step: N = B·T tokens × V classes
(GPT-2: 16×1024 × 50,257 = 1.65 GB in bf16; Llama 3, V = 128,256: 4.2 GB in fp32 per 8k
tokens), and the usual path keeps several of them alive (the logits, an fp32 copy, the saved
log-probabilities, their gradient). Here the rows are processed chunk by chunk (Liger-Kernel's
design, Hsu et al. 2024, arXiv 2410.10989, §3.1); for each chunk c of rows, all in the forward:

    Z_c   = h_c·Wᵀ + b                        (R, V), in h's dtype           2·R·d·V FLOPs
    ℓ_c, G_c = CE(Z_c, y_c), G_c = s·∂ℓ/∂Z_c   the CE kernel, G_c written over Z_c (ltk/kernels/cross_entropy.py)
    dh_c  = G_c·W                             (R, d)                          2·R·d·V
    dW   += G_cᵀ·h_c                          (V, d), accumulated in fp32    2·R·d·V
    db   += Σ_rows G_c                        (V,),   fp32

with s = 1/n_valid (mean) or 1 (sum). The backward only multiplies dh, dW, db by grad_output
(a scalar). The forward therefore costs the three matmuls of forward + backward (6·N·d·V
FLOPs) and holds at once only one chunk's logits beside the outputs' gradients — dW in fp32
is the largest (V·d·4 bytes), and it exists in the unfused path too.

reduction="none" is refused: dW = Σ_i g_i·G_iᵀh_i needs each row's grad_output g_i, known
only in the backward, after the chunks are gone; it would need the per-row gradients kept
(the (N, V) tensor this op exists to avoid) or a second pass over the chunks.

The chunk size, when `chunk_rows` is not given: the rows whose chunk buffers fit
`memory_budget` bytes (default DEFAULT_BUDGET = 256 MiB), at least 1, a multiple of 16 when
≥ 16 (aligned GEMM tiles), at most N:

    triton   V·e bytes a row             (the logits, overwritten by their gradient)
    torch    V·(e + 4 + 4·[soft-cap] + e·[e < 4]) bytes a row
             (the logits, the fp32 working copy that becomes the gradient, tanh for the
              soft-cap's derivative, the gradient cast back for dh's matmul in fp16/bf16)

(e = bytes of h's dtype). Beside the chunk: dh (N·d·e), dW (V·d·4), db (V·4) and, with a W
of another dtype than h, one copy of W in h's dtype (what autocast makes for F.linear too).

dtypes: the matmuls run in h's dtype (under autocast, in the autocast dtype, as F.linear
would); W (and b) may be fp32 with fp16/bf16 h: their gradients come back in their own dtype.
The loss has h's dtype. The Triton backend runs the CE kernel in place on each chunk; the
torch backend is the same chunked autograd.Function with torch ops (the CPU saving is real).
`fused_linear_cross_entropy_reference` is the unfused formula, the tests' ground truth.
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import check_float, check_same_device, resolve_backend
from ltk.kernels.cross_entropy import (
    ce_rows_torch,
    ce_rows_triton,
    check_options,
    count_valid,
    cross_entropy_reference,
    mean_scale,
    reduce_rows,
    scale_in_place,
)
from ltk.kernels.norm_common import check_mode

DEFAULT_BUDGET = 256 * 2**20


def bytes_per_row(vocab: int, dtype: torch.dtype, backend: str, softcap: bool = False) -> int:
    """Chunk memory per row (the module docstring's table)."""
    e = torch.finfo(dtype).bits // 8
    if backend == "triton":
        return vocab * e
    return vocab * (e + 4 + 4 * softcap + e * (e < 4))


def choose_chunk_rows(n: int, vocab: int, dtype: torch.dtype, backend: str, softcap: bool = False,
                      memory_budget: int | None = None) -> int:
    """Rows per chunk from the memory budget (bytes), by the module docstring's rule."""
    budget = DEFAULT_BUDGET if memory_budget is None else memory_budget
    rows = max(1, budget // bytes_per_row(vocab, dtype, backend, softcap))
    if rows >= 16:
        rows -= rows % 16
    return max(1, min(rows, n))


def _accumulate_dw(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, d) fp32 += gᵀ·h without a (V, d) temporary where the hardware allows."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h.to(acc.dtype))
        return
    if acc.is_cuda:
        try:  # cuBLAS: fp16/bf16 inputs, fp32 output, accumulated in place (torch ≥ 2.8)
            torch.addmm(acc, g.t(), h, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.add_(g.t() @ h)   # a (V, d) product in g's dtype, then the fp32 add


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
                chunk_rows, backend):
        n, d = h.shape
        v = weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        w = weight.to(h.dtype)                                   # a copy only when the dtypes differ
        b = None if bias is None else bias.to(h.dtype)
        n_valid = count_valid(target, v, ignore_index)
        s = mean_scale(reduction, n_valid)
        opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, scale=s)
        write = need_h or need_w or need_b
        dh = torch.empty_like(h) if need_h else None
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        dw = torch.zeros(v, d, dtype=acc, device=h.device) if need_w else None
        db = torch.zeros(v, dtype=acc, device=h.device) if need_b else None
        rows = torch.empty(n, dtype=acc, device=h.device)
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            hc, yc = h[r0:r1], target[r0:r1]                       # (R, d), (R,)
            z = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())   # (R, V): the chunk's logits
            if backend == "triton":
                rows[r0:r1] = ce_rows_triton(z, yc, write_grad=write, **opts)
                g = z                                                # now s·∂ℓ/∂Z, in h's dtype
            else:
                rows[r0:r1], g = ce_rows_torch(z, yc, want_grad=write, **opts)   # g: fp32 (R, V)
                del z
            if not write:
                continue
            if need_h:
                dh[r0:r1] = g.to(h.dtype) @ w                        # (R, V)·(V, d)
            if need_w:
                _accumulate_dw(dw, g, hc)
            if need_b:
                db += g.sum(0, dtype=acc)
            del g
        if write:
            ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype),
                                  None if db is None else db.to(bias.dtype))
            ctx.used = False
        return reduce_rows(rows, reduction, n_valid, target.shape).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy's backward ran twice: its gradients were computed in the "
                               "forward and scaled in place by the first backward; compute the loss again")
        ctx.used = True
        grads = [None if t is None else scale_in_place(t, grad_output, False) for t in ctx.saved_tensors]
        return grads[0], grads[1], None, grads[2], None, None, None, None, None, None, None


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                               reduction: str = "mean", chunk_rows: int | None = None,
                               memory_budget: int | None = None, backend: str = "auto") -> torch.Tensor:
    """CE(h·weightᵀ + bias, target) for h (N, d) (or (..., d) with target (...)), weight (V, d)
    (the LM head, or the tied embedding), bias (V,) or None, target int64 class indices;
    options as ltk.kernels.cross_entropy.cross_entropy. reduction: "mean" or "sum" ("none" is
    refused; module docstring). chunk_rows: rows per chunk; None = from memory_budget (bytes,
    default 256 MiB) by the rule in the module docstring. Returns a scalar in h's dtype."""
    check_float("h", h, _TORCH_DTYPES)
    check_float("weight", weight, _TORCH_DTYPES)
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must have shape (V, d) with d = h's last dim; got h {tuple(h.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V = 0 rows: there is no class to predict")
    if not isinstance(target, torch.Tensor) or target.shape != h.shape[:-1]:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must have shape {tuple(h.shape[:-1])} (h without its last dim), got {got}")
    if bias is not None:
        check_float("bias", bias, _TORCH_DTYPES)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight's rows; "
                             f"got {tuple(bias.shape)}")
    check_options(ignore_index, label_smoothing, z_loss, softcap, reduction)
    if reduction == "none":
        raise ValueError("fused_linear_cross_entropy takes reduction='mean' or 'sum': with 'none' the weight "
                         "gradient would need each row's grad_output, known only after the chunks are gone "
                         "(use cross_entropy on the logits for per-token losses)")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    check_same_device(h=h, weight=weight, target=target, bias=bias)
    backend = resolve_backend(backend, h)
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype != torch.float64:
        h = h.to(torch.get_autocast_dtype(dev))                  # the dtype F.linear would compute in
    if backend == "triton":
        check_float("h", h, _TRITON_DTYPES)
    h2, y = h.reshape(-1, h.shape[-1]), target.reshape(-1)       # (N, d), (N,)
    if chunk_rows is None:
        chunk_rows = choose_chunk_rows(h2.shape[0], weight.shape[0], h.dtype, backend, softcap is not None,
                                       memory_budget)
    with torch.autocast(dev, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(
            h2, weight, y, bias, ignore_index, float(label_smoothing), float(z_loss),
            None if softcap is None else float(softcap), reduction, chunk_rows, backend)


def fused_linear_cross_entropy_reference(h, weight, target, bias=None, **options):
    """The unfused formula: cross_entropy_reference(h·Wᵀ + b, target, **options)."""
    logits = h @ weight.t() if bias is None else h @ weight.t() + bias
    return cross_entropy_reference(logits, target, **options)


# ---------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------
def flops(rows: int, d: int, vocab: int, *, mode: str = "fwd+bwd") -> int:
    """The three matmuls, 2·N·d·V each: the logits (fwd), dh and dW (bwd, computed in our
    forward), plus the CE kernel's ~13 FLOPs a logit (ltk/kernels/cross_entropy.py)."""
    check_mode(mode)
    mm = 2 * rows * d * vocab
    return {"fwd": mm + 5 * rows * vocab, "bwd": 2 * mm + 8 * rows * vocab, "fwd+bwd": 3 * mm + 13 * rows * vocab}[mode]


def bytes_moved(rows: int, d: int, vocab: int, *, dtype_bytes: int = 2, mode: str = "fwd+bwd",
                chunk_rows: int | None = None) -> int:
    """Least HBM traffic of the fused loss step (fwd+bwd): read h and W once per chunk for the
    logits and again for dh and dW (W: 3 reads a chunk), write and read each chunk's logits
    twice in the CE kernel (pass 1 read, pass 2 read + write) and once more for the two
    gradient matmuls, read-modify-write the fp32 dW once a chunk, write dh; the backward's
    scaling (dh, dW) when grad_output ≠ 1 is not counted. With chunk_rows = N (one chunk) this
    is the unfused minimum; smaller chunks re-read W: the price of the memory saved."""
    check_mode(mode)
    e = dtype_bytes
    chunks = 1 if not chunk_rows else -(-rows // chunk_rows)
    h, w, z = rows * d * e, vocab * d * e, rows * vocab * e
    fwd = h + chunks * w + z * 2 + rows * 12                  # logits written, read by pass 1
    bwd = chunks * (2 * w + vocab * d * 8) + 2 * h + z * 4    # pass 2 rw, two matmul reads; dW rmw; h read, dh written
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
