"""Attention of one block of queries against one block of keys, as ring attention needs it:
the forward returns the block's log-sum-exp beside its output, and the backward takes the
*final* output and log-sum-exp of the query rows (merged over every block), so the
probabilities it recomputes are the final ones (FlashAttention-2's backward, Dao 2023,
arXiv 2307.08691, Algorithm 2, applied block by block as in Liu et al. 2023, "Ring Attention
with Blockwise Transformers", arXiv 2310.01889, §3).

For queries Q (T rows) and one block of keys K, V (S rows), mask M (bottom-right causal when
the block sits on the diagonal, padded keys masked):

    forward    S = scale·Q Kᵀ + M      lse_blk = logsumexp_j S      O_blk = exp(S − lse_blk) V
    merge      lse = log Σ_blk exp(lse_blk)      O = Σ_blk exp(lse_blk − lse) O_blk   (`merge`)
    backward   P = exp(S − lse)  (the final lse: P is this block's slice of the full softmax)
               D = rowsum(dO ∘ O)                 (O, dO: the final ones)
               dV = Pᵀ dO    dS = P ∘ (dO Vᵀ − D)    dQ = scale·dS K    dK = scale·dSᵀ Q

Summing dQ over the blocks, and dK, dV over the query blocks, gives the exact gradients.
GQA: query head h reads key/value head h // (H / H_kv); dK, dV sum over the heads of a group.

Backends. "torch": plain matmuls in fp32 (fp64 for fp64 inputs), any device. "triton": our
fused kernels (ltk/kernels/attention.py) — their forward saves the lse (in base 2, converted
here) and their backward takes one, so both directions run per block on the GPU.
"""
from __future__ import annotations

import torch

from ltk.kernels.attention import LOG2E, _backward_triton, _forward_triton, _last_dim_unit, _LaunchArgs
from ltk.kernels.backend import resolve_backend

NEG_INF = float("-inf")


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Merges and accumulators run in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def merge(o: torch.Tensor, lse: torch.Tensor, o_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """o, lse ← the attention over both sets of keys, in place (o (.., T, D), lse (.., T)).
    A row with lse = −inf in both stays (0, −inf) instead of NaN."""
    new = torch.logaddexp(lse, lse_blk)
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    o.mul_(torch.exp(lse - ref).unsqueeze(-1)).add_(torch.exp(lse_blk - ref).unsqueeze(-1) * o_blk.to(o.dtype))
    lse.copy_(new)


def _scores(q, k, scale, causal, kpm):
    """fp32/fp64 scores (B, H, T, S) with the mask applied as −inf; k repeated for GQA."""
    T, S = q.shape[2], k.shape[2]
    dt = acc_dtype(q)
    k = k.to(dt).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, S, D)
    s = (q.to(dt) @ k.transpose(-2, -1)) * scale
    if causal:  # bottom-right aligned: query i sees key j <= i + (S − T)
        i = torch.arange(T, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(S, device=q.device)[None, :] > i + (S - T), NEG_INF)
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], NEG_INF)
    return s, k


def _group_sum(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    B, H, S, D = x.shape
    return x.view(B, h_kv, H // h_kv, S, D).sum(2)  # (B, H_kv, S, D)


def _triton_args(q, k, causal, scale, kpm):
    if scale <= 0:
        raise ValueError(f"the triton block kernels need softmax_scale > 0, got {scale}")
    q, k = _last_dim_unit(q), _last_dim_unit(k)
    return q, k, _LaunchArgs(q, k, None, None if kpm is None else kpm.contiguous(), causal, scale)


def block_forward(q, k, v, *, causal: bool, scale: float, kpm=None, backend: str = "auto"):
    """(O_blk, lse_blk) of q (B, H, T, D) against k, v (B, H_kv, S, D); kpm (B, S) bool, True
    where a key may be seen. Every query row must see a key (the ring never asks otherwise).
    O_blk in the accumulation dtype (torch) or q's dtype (triton); lse_blk fp32/fp64, natural log."""
    if resolve_backend(backend, q) == "triton":
        q, k, a = _triton_args(q, k, causal, scale, kpm)
        o, lse2 = _forward_triton(q, k, _last_dim_unit(v), a)
        return o, lse2 / LOG2E  # the kernel's lse is in base 2
    s, _ = _scores(q, k, scale, causal, kpm)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, T)
    p = torch.exp(s - lse.unsqueeze(-1))
    v = v.to(s.dtype).repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, H, S, D)
    return p @ v, lse


def block_backward(q, k, v, o, lse, do, *, causal: bool, scale: float, kpm=None, backend: str = "auto"):
    """(dQ, dK, dV) of this block's share of the loss, given the final o (B, H, T, D), lse
    (B, H, T) and the gradient do of the output; dK, dV (B, H_kv, S, D). fp32/fp64 (torch) or
    q's dtype (triton)."""
    if resolve_backend(backend, q) == "triton":
        q, k, a = _triton_args(q, k, causal, scale, kpm)
        o, do = o.to(q.dtype).contiguous(), do.to(q.dtype).contiguous()
        dq, dk, dv, _ = _backward_triton(q, k, _last_dim_unit(v), o, (lse * LOG2E).float().contiguous(), do, a,
                                         True, True, False)
        return dq, dk, dv
    s, k_rep = _scores(q, k, scale, causal, kpm)
    dt = s.dtype
    p = torch.exp(s - lse.to(dt).unsqueeze(-1))  # (B, H, T, S): the final softmax's slice
    do, o = do.to(dt), o.to(dt)
    v_rep = v.to(dt).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    d = (do * o).sum(-1, keepdim=True)  # (B, H, T, 1)
    ds = p * (do @ v_rep.transpose(-2, -1) - d)
    dq = (ds @ k_rep) * scale
    dk = _group_sum((ds.transpose(-2, -1) @ q.to(dt)) * scale, k.shape[1])
    dv = _group_sum(p.transpose(-2, -1) @ do, v.shape[1])
    return dq, dk, dv
