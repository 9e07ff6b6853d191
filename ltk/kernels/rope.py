"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864, eq. 34), in the
"rotate half" pairing of transformers' Llama — the plain-PyTorch reference, standing in for
the fused kernel.

    rotate_half([x1, x2]) = [−x2, x1]          (halves of the head dim D)
    q' = q ∘ cos + rotate_half(q) ∘ sin        k' likewise
    dq = dq' ∘ cos − rotate_half(dq' ∘ sin)    (the rotation's transpose)

Autograd runs through the torch ops.
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import resolve_backend


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') for q (B, Hq, T, D), k (B, Hkv, T, D); cos, sin (T, D), (B, T, D) or (B, 1, T, D).
    Torch reference; with `inplace` the results are written into q and k, which are returned."""
    resolve_backend(backend, q)
    if cos.dim() not in (2, 3, 4) or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must both be (T, D), (B, T, D) or (B, 1, T, D), got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): one angle for every head
    q2 = q * cos + _rotate_half(q) * sin
    k2 = k * cos + _rotate_half(k) * sin
    if inplace:
        return q.copy_(q2), k.copy_(k2)
    return q2, k2
