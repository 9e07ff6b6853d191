"""SwiGLU, y = silu(gate) ∘ up (Shazeer 2020, "GLU Variants Improve Transformer", arXiv
2002.05202, eq. 5) — the plain-PyTorch reference, standing in for the fused kernel.

    silu(a) = a · σ(a)
    dgate = dy ∘ up ∘ σ(gate) · (1 + gate · (1 − σ(gate)))      dup = dy ∘ silu(gate)

Autograd runs through the torch ops; `recompute` and `backend` are accepted (and `backend`
checked) so that callers are written against the fused kernel's signature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.kernels.backend import resolve_backend


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, recompute: bool = True, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape (..., I). Torch reference."""
    resolve_backend(backend, gate)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return F.silu(gate) * up
