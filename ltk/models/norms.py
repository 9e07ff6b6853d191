"""Normalization layers that run on the backend the model was built with.

Each layer owns its parameters (`weight`, `bias`: the same names as torch.nn.LayerNorm, so
checkpoints do not care which backend wrote them) and calls the op from ltk/kernels/, which
runs either PyTorch's own implementation or our fused Triton kernel.

`forward(x, residual=None)`: with a residual it computes h = x + residual and y = norm(h)
in one fused pass and returns (y, h) — the shape of every pre-norm block, where h is the
residual stream that the next block adds to. Fusing the add saves one full read and write
of the activations per block.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ltk.kernels.layernorm import layer_norm, layer_norm_residual
from ltk.kernels.rmsnorm import rms_norm, rms_norm_residual


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)
        return layer_norm_residual(x, residual, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, bias={self.bias is not None}, backend={self.backend}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps, backend=self.backend)
        return rms_norm_residual(x, residual, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, backend={self.backend}"
