"""Cross-entropy over logits, with the gradient written in place of the logits.

Forward, per row i with target y (rows whose target is `ignore_index` give 0 and are not
counted), logits x ∈ R^V, optional soft-cap c (Gemma 2, Team et al. 2024, §2: z = c·tanh(x/c);
without it z = x), label smoothing ε (Szegedy et al. 2016, "Rethinking the Inception
Architecture", §7; defined as torch's F.cross_entropy does: the target is (1 − ε)·onehot(y) + ε/V)
and z-loss weight ζ (PaLM, Chowdhery et al. 2022, §5: ζ·log²Z added per row, Z = Σ_j e^{z_j}):

    lse_i = log Σ_j exp(z_ij)                                  (online max/sum, Milakov & Gimelshein 2018)
    ℓ_i   = lse_i − (1 − ε)·z_iy − (ε/V)·Σ_j z_ij + ζ·lse_i²
    loss  = Σ_i ℓ_i / n_valid   (mean)     Σ_i ℓ_i   (sum)     ℓ   (none, 0 on ignored rows)

Backward, with p = softmax(z_i) and s = 1/n_valid (mean) or 1 (sum, none):

    ∂ℓ_i/∂z_ij = p_j·(1 + 2ζ·lse_i) − ε/V − (1 − ε)·[j = y]
    ∂ℓ_i/∂x_ij = ∂ℓ_i/∂z_ij · (1 − tanh²(x_ij/c))              (soft-cap; 1 without)
    dlogits    = s · ∂ℓ/∂x · grad_output                         (ignored rows: 0)

In place (Liger-Kernel's design, Hsu et al. 2024): the forward, which reads every logit
anyway, also writes s·∂ℓ/∂x *over the logits*, so no second (N, V) tensor ever exists; the
backward only multiplies that buffer by grad_output (in place; skipped when it is 1). So:

  * THE CALLER'S LOGITS ARE OVERWRITTEN when they require grad (`inplace=True`, the default).
    Their version counter is bumped, so an autograd node that saved them (e.g. a torch tanh
    soft-cap applied before this call) raises "modified by an inplace operation" instead of
    computing a wrong gradient. `inplace=False` works on a copy (one more (N, V) tensor).
    Logits that do not require grad are only read.
  * The backward may run once (a second one would see the buffer already scaled).

The Triton kernel: one program per row, two passes over V in BLOCK-wide pieces; pass 1 the
online max and sum (and Σz for smoothing), pass 2 the gradient, computed in fp32 and rounded
once to the logits' dtype on store. The torch backend runs the same math with torch ops on
row chunks of the logits (bounded fp32 temporaries, the gradient copied in place the same way);
`cross_entropy_reference` is the plain autograd formula, the tests' float64 ground truth.

Cost (fused, per element): pass 1 reads x (≈ 5 FLOPs: max, sub, exp, add; +tanh), pass 2 reads
x and writes dx (≈ 6 FLOPs); the backward's scaling, when grad_output ≠ 1, reads and writes
once more. Unfused (log_softmax, nll, their backward) it is ~4 passes forward and ~4 backward
over an fp32 (N, V) tensor plus the saved log-probabilities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltk.kernels.backend import HAS_TRITON, check_float, check_same_device, resolve_backend
from ltk.kernels.norm_common import check_mode, next_pow2, on_device
from ltk.kernels.poison import output_allocator

REDUCTIONS = ("mean", "sum", "none")
MAX_BLOCK = 4096          # V-piece one program holds (fp32 in registers: 16 values a thread at 8 warps)
TORCH_CHUNK_BYTES = 64 * 2**20  # torch backend: fp32 working memory per row chunk
POISON_OUTPUTS = False          # NaN-filled loss buffers (tests, the GPU check): ltk/kernels/poison.py
_empty = output_allocator(__name__)

if HAS_TRITON:
    import triton
    import triton.language as tl

    _LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _tanh(u):
        """tanh from exp (libdevice's tanh does not run under the interpreter): sign(u)·(1−e)/(1+e),
        e = exp(−2|u|) ≤ 1, so nothing overflows."""
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _ce_kernel(X, stride, Y, LOSS, V, ignore_index, smoothing, z_loss, softcap, scale,
                   HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """Program `row`: ℓ_row into LOSS (fp32) and, with WRITE_GRAD, scale·∂ℓ/∂x over X's row."""
        row = tl.program_id(0).to(tl.int64)   # row·stride may pass 2**31
        X += row * stride
        y = tl.load(Y + row)
        cols = tl.arange(0, BLOCK)
        if y == ignore_index:
            if WRITE_GRAD:
                for c0 in range(0, V, BLOCK):
                    tl.store(X + c0 + cols, tl.zeros((BLOCK,), tl.float32).to(X.dtype.element_ty), mask=c0 + cols < V)
            tl.store(LOSS + row, 0.0)
            return
        # pass 1: lse by the online softmax (one read of the row), Σz for label smoothing
        m = float("-inf")
        d = 0.0
        zsum = 0.0
        for c0 in range(0, V, BLOCK):
            ok = c0 + cols < V
            z = tl.load(X + c0 + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            zsum += tl.sum(tl.where(ok, z, 0.0))
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((z - m_new) * _LOG2E))
            m = m_new
        lse = m + tl.log(d)
        zy = tl.load(X + y).to(tl.float32)
        if HAS_SOFTCAP:
            zy = softcap * _tanh(zy / softcap)
        loss = lse - (1.0 - smoothing) * zy - smoothing / V * zsum + z_loss * lse * lse
        tl.store(LOSS + row, loss)
        if WRITE_GRAD:
            tl.debug_barrier()  # every read of pass 1 (and of x_y) before the first overwrite
            coef = 1.0 + 2.0 * z_loss * lse
            for c0 in range(0, V, BLOCK):
                ok = c0 + cols < V
                z = tl.load(X + c0 + cols, mask=ok, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    z = softcap * t
                g = tl.exp2((z - lse) * _LOG2E) * coef - smoothing / V
                g = tl.where(c0 + cols == y, g - (1.0 - smoothing), g)  # fp32, before rounding: p_y − 1 cancels
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(X + c0 + cols, (g * scale).to(X.dtype.element_ty), mask=ok)


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the V-piece of a pass (whole rows up to MAX_BLOCK) and the warps
    (one per 512 elements, 4 to 8; the interpreter ignores it)."""
    block = min(MAX_BLOCK, next_pow2(V))
    return block, min(8, max(4, block // 512))


def ce_rows_triton(x: torch.Tensor, target: torch.Tensor, *, ignore_index: int, label_smoothing: float,
                   z_loss: float, softcap: float | None, scale: float, write_grad: bool) -> torch.Tensor:
    """ℓ per row (fp32, (R,)) of the (R, V) logits x (rows contiguous); with `write_grad`,
    x is overwritten with scale·∂ℓ/∂x. The kernel the fused linear cross-entropy calls per chunk."""
    r, v = x.shape
    loss = _empty((r,), torch.float32, x.device)
    if r == 0:
        return loss
    block, warps = launch_config(v)
    with on_device(x):
        _ce_kernel[(r,)](x, x.stride(0), target, loss, v, ignore_index, float(label_smoothing), float(z_loss),
                         float(softcap or 1.0), float(scale), HAS_SOFTCAP=softcap is not None,
                         WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps)
    return loss


def ce_rows_torch(x: torch.Tensor, target: torch.Tensor, *, ignore_index: int, label_smoothing: float,
                  z_loss: float, softcap: float | None, scale: float,
                  want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same math with torch ops on (R, V) logits x (left untouched): (ℓ per row, and with
    `want_grad` scale·∂ℓ/∂x as a new tensor in fp32, float64 for float64 x). Holds two (R, V)
    fp32 temporaries (three with a soft-cap)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.shape[1]
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)   # (R, 1), in range
    z = x.to(cdt, copy=True)
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    lse = torch.logsumexp(z, dim=1)                                             # (R,)
    loss = lse - (1 - label_smoothing) * z.gather(1, safe).squeeze(1) + z_loss * lse * lse
    if label_smoothing:
        loss = loss - label_smoothing / v * z.sum(1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))                     # fp32 (float64 for float64 x)
    if not want_grad:
        return loss, None
    g = z.sub_(lse.unsqueeze(1)).exp_()                                         # p, in place of z
    g.mul_((1 + 2 * z_loss * lse).unsqueeze(1))
    if label_smoothing:
        g.sub_(label_smoothing / v)
    g.scatter_add_(1, safe, torch.full_like(safe, -(1 - label_smoothing), dtype=cdt))
    if t is not None:
        g.mul_(t.mul_(t).neg_().add_(1))                                        # 1 − tanh²
    g.mul_((valid.to(cdt) * scale).unsqueeze(1))                                # s, 0 on ignored rows
    return loss, g


# ---------------------------------------------------------------------------------------
# reference: the formula in plain autograd ops (float64 in the tests)
# ---------------------------------------------------------------------------------------
def cross_entropy_reference(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                            reduction="mean"):
    z = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
    rows = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = target != ignore_index
    rows = rows + z_loss * torch.logsumexp(z, dim=-1) ** 2 * valid
    if reduction == "none":
        return rows
    return rows.sum() / valid.sum() if reduction == "mean" else rows.sum()


# ---------------------------------------------------------------------------------------
# checks shared with the fused linear cross-entropy
# ---------------------------------------------------------------------------------------
def check_options(ignore_index, label_smoothing, z_loss, softcap, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite number ≥ 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def count_valid(target: torch.Tensor, V: int, ignore_index: int) -> int:
    """The rows that count (target ≠ ignore_index); refuses targets outside [0, V) (one sync)."""
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be an int64 (or int32) tensor of class indices, got {target.dtype}")
    valid = target != ignore_index
    bad, n = torch.stack([(valid & ((target < 0) | (target >= V))).sum(), valid.sum()]).tolist()
    if bad:
        raise ValueError(f"target has {bad} value(s) outside [0, {V}) that are not ignore_index={ignore_index}")
    return n


def mean_scale(reduction: str, n_valid: int) -> float:
    """s of the module docstring. With no valid row the mean is 0/0 = nan, as torch's; the
    gradient is 0 (every row is ignored)."""
    return (1.0 / n_valid if n_valid else 0.0) if reduction == "mean" else 1.0


def reduce_rows(rows: torch.Tensor, reduction: str, n_valid: int, shape) -> torch.Tensor:
    if reduction == "none":
        return rows.view(shape)
    total = rows.sum()
    return total / n_valid if reduction == "mean" else total   # n_valid = 0: nan, as torch


def scale_in_place(buf: torch.Tensor, grad_output: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """buf · grad_output in place (per row when `rowwise`), skipped when grad_output is 1."""
    if rowwise:
        return buf.mul_(grad_output.reshape(-1, *([1] * (buf.dim() - 1))).to(buf.dtype))
    if not torch.equal(grad_output, torch.ones_like(grad_output)):
        buf.mul_(grad_output.to(buf.dtype))
    return buf


# ---------------------------------------------------------------------------------------
# autograd function and public API
# ---------------------------------------------------------------------------------------
class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, softcap, reduction, backend, inplace):
        v = logits.shape[-1]
        x = logits.reshape(-1, v)                                    # (N, V), a view when contiguous
        y = target.reshape(-1)
        write = ctx.needs_input_grad[0]
        if x.stride(-1) != 1:                                        # the kernel walks a row's elements
            x = x.contiguous()
        elif write and not inplace:
            x = x.clone()
        n_valid = count_valid(y, v, ignore_index)
        s = mean_scale(reduction, n_valid)
        opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, scale=s)
        if backend == "triton":
            rows = ce_rows_triton(x, y, write_grad=write, **opts)
        else:
            rows = torch.empty(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
            step = max(1, TORCH_CHUNK_BYTES // (8 * v))             # rows whose two fp32 temporaries fit the chunk
            for r0 in range(0, x.shape[0], step):
                rows[r0:r0 + step], g = ce_rows_torch(x[r0:r0 + step], y[r0:r0 + step], want_grad=write, **opts)
                if write:
                    x[r0:r0 + step].copy_(g)
        if write:
            if x.data_ptr() == logits.data_ptr():                    # written in place: x is a view of logits
                torch.autograd.graph.increment_version(logits)      # a node that saved them now errors
                x = logits                                           # saved as itself (a view made here may not be)
            ctx.save_for_backward(x)
            ctx.shape, ctx.reduction, ctx.used = logits.shape, reduction, False
        return reduce_rows(rows, reduction, n_valid, target.shape).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("cross_entropy's backward ran twice: its gradient lives in the logits buffer, which the "
                               "first backward scaled in place; compute the loss again for a second backward")
        ctx.used = True
        (buf,) = ctx.saved_tensors
        dx = scale_in_place(buf.view(-1, buf.shape[-1]), grad_output, ctx.reduction == "none").view(ctx.shape)
        return dx, None, None, None, None, None, None, None, None


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  reduction: str = "mean", backend: str = "auto", inplace: bool = True) -> torch.Tensor:
    """Cross-entropy of logits (..., V) (any float dtype) against target (...) (int64 class
    indices), with the options and equations of the module docstring. Returns a scalar in the
    logits' dtype (mean, sum) or ℓ of target's shape (none).

    inplace=True (default, as Liger): when the logits require grad they are OVERWRITTEN with
    their gradient during this call; do not read them afterwards. inplace=False copies first."""
    check_float("logits", logits, _TORCH_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V ≥ 1, got {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor) or target.shape != logits.shape[:-1]:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} (logits without the class dim), got {got}")
    check_options(ignore_index, label_smoothing, z_loss, softcap, reduction)
    check_same_device(logits=logits, target=target)
    backend = resolve_backend(backend, logits)
    if backend == "triton":
        check_float("logits", logits, _TRITON_DTYPES)
    return CrossEntropyFunction.apply(logits, target, ignore_index, float(label_smoothing), float(z_loss),
                                      None if softcap is None else float(softcap), reduction, backend, bool(inplace))


# ---------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------
def flops(rows: int, vocab: int, *, mode: str = "fwd+bwd", softcap: bool = False) -> int:
    """FLOPs of the fused kernel per element: pass 1 ≈ 5 (max, subtract, exp, add, Σz), pass 2
    ≈ 6 (subtract, exp, scale, smoothing, target select, scale by s); a soft-cap adds ≈ 4 per
    pass (divide, exp-based tanh, multiply) and 2 for its derivative. The backward (scaling by
    grad_output) is 1. "fwd" here is the loss alone, without the gradient pass."""
    check_mode(mode)
    cap = 4 if softcap else 0
    per = {"fwd": 5 + cap, "bwd": 1, "fwd+bwd": 5 + cap + 6 + cap + 2 * bool(softcap) + 1}[mode]
    return per * rows * vocab


def bytes_moved(rows: int, vocab: int, *, dtype_bytes: int = 2, mode: str = "fwd+bwd") -> int:
    """HBM traffic of the fused kernel: the loss alone reads the logits once; with the gradient
    ("fwd+bwd") pass 1 reads, pass 2 reads and writes them, and the backward's scaling reads and
    writes once more (skipped when grad_output is 1: subtract 2·R·V·bytes). Targets: 8 bytes a
    row, the loss: 4."""
    check_mode(mode)
    act = rows * vocab * dtype_bytes
    per_row = rows * 12
    return {"fwd": act + per_row, "bwd": 2 * act, "fwd+bwd": 5 * act + per_row}[mode]
