"""Fused linear cross-entropy, CE(h · Wᵀ + b, y) — the plain-PyTorch reference, standing in for
the chunked kernel. This reference builds the full (N, V) logits (the memory the kernel saves);
the options are those of ltk/kernels/cross_entropy.py.

    logits = h Wᵀ + b           (N, V)
    dh = dlogits · W            dW = dlogitsᵀ · h           db = Σ_rows dlogits

Autograd runs through the torch ops; `chunk_rows` and `memory_budget` are accepted for the
kernel's signature and do nothing here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.kernels.backend import resolve_backend
from ltk.kernels.cross_entropy import cross_entropy


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                               reduction: str = "mean", chunk_rows: int | None = None,
                               memory_budget: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Loss of h (N, d) through weight (V, d) (+ bias (V,)) against target (N,). Torch reference."""
    resolve_backend(backend, h)
    logits = F.linear(h, weight, bias)  # (N, V)
    return cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         z_loss=z_loss, softcap=softcap, reduction=reduction, backend="torch")
