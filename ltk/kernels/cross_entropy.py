"""Cross-entropy over logits, with ignore_index, label smoothing, z-loss (PaLM, Chowdhery et
al. 2022, arXiv 2204.02311, section 5) and a logit soft-cap (Gemma 2, arXiv 2408.00118) — the
plain-PyTorch reference, standing in for the kernel.

    z = c · tanh(x / c)      (soft-cap c, when given)
    ℓ = −log softmax(z)_y ( · (1 − ε), + ε · mean_j −log softmax(z)_j )  + λ · logsumexp(z)²
    mean = Σ_valid ℓ / #valid       (rows whose target is ignore_index count for nothing)

Autograd runs through the torch ops, in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.kernels.backend import resolve_backend


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Loss of logits (N, V) against target (N,); reduction mean | sum | none. Torch reference."""
    resolve_backend(backend, logits)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(z, dim=-1).square() * valid
    if reduction == "none":
        return loss
    return loss.sum() / valid.sum() if reduction == "mean" else loss.sum()
