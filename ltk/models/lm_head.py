"""The language-model head and its loss, one setting for the zoo (`model.loss`):

    logits = h · Wᵀ (+ b)                         h (B, T, C), W (V, C): (B, T, V)
    L      = mean over targets y ≠ ignore_index of  −log softmax(h · Wᵀ + b)_y

    full    the logits are built, cast to fp32 and scored (F.cross_entropy): the reference, and
            what every model did before the fused loss existed — bit for bit the same losses
    fused   ltk/kernels/fused_linear_ce.py: the loss and its gradients computed chunk by chunk of
            rows, so the (B·T, V) logits, their fp32 copy and their gradient never exist (Liger's
            fused linear cross-entropy; Hsu et al. 2024). For GPT-2 at 16 x 1024 tokens that is
            1.6 GB of bf16 logits plus 3.3 GB each for the fp32 copy and its gradient, not held
    auto    fused where the model's kernels are Triton's (`model.backend` resolving to triton: a
            CUDA device), full elsewhere — so the CPU default keeps its exact reference numbers

A model calls its head with the targets (`GPT.forward(idx, targets=y)`), and the head — a module,
so that every engine that gathers a module's parameters around its forward (our ZeRO-3, FSDP2,
DeepSpeed's stage 3) sees the call — returns the loss instead of the logits. Tensor parallelism
scores its vocabulary slice with Megatron's vocab-parallel loss instead (ltk/parallel/tp_plan.py),
and the pipeline's last stage builds its micro-batch's logits: both call the head without targets.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.kernels.backend import resolve_backend

LOSSES = ("auto", "full", "fused")


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"model.loss must be one of {LOSSES}, got {loss!r}")


def resolve_loss(loss: str, backend: str, h: torch.Tensor) -> str:
    check_loss(loss)
    if loss == "auto":
        return "fused" if resolve_backend(backend, h) == "triton" else "full"
    return loss


def head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None, *,
              loss: str = "auto", backend: str = "auto", ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the logits h · weightᵀ + bias against targets (module docstring).
    h (..., C), targets (...) of the same leading shape, weight (V, C), bias (V,) or None."""
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match the hidden states "
                         f"{tuple(h.shape)} (expected {tuple(h.shape[:-1])})")
    if resolve_loss(loss, backend, h) == "full":
        logits = F.linear(h, weight, bias)  # (..., V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=ignore_index)
    from ltk.kernels.fused_linear_ce import fused_linear_cross_entropy

    return fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), bias,
                                      ignore_index=ignore_index, backend=backend)  # (B·T, C) rows


class LMHead(nn.Linear):
    """nn.Linear(C, V) whose forward takes the targets too: logits without them, the loss with."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, loss: str = "auto",
                 backend: str = "auto", **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        check_loss(loss)
        self.loss, self.backend = loss, backend

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        if targets is None:
            return super().forward(h)
        return head_loss(h, self.weight, targets, self.bias, loss=self.loss, backend=self.backend,
                         ignore_index=ignore_index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss}"
