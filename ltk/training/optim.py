"""AdamW with decay / no-decay groups, and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019, Algorithm 2), per parameter θ with gradient g at step t:

    m_t = β1·m_{t-1} + (1-β1)·g                  first moment
    v_t = β2·v_{t-1} + (1-β2)·g²                 second moment
    θ_t = θ_{t-1} - lr_t·( m̂_t / (sqrt(v̂_t) + ε) + λ·θ_{t-1} )
          with m̂_t = m_t/(1-β1^t), v̂_t = v_t/(1-β2^t)

The weight decay λ is *decoupled*: it shrinks θ directly instead of being added to g, so
it is not rescaled by 1/sqrt(v̂). It is applied to matrices only (see `GPT.param_groups`).
AdamW keeps two fp32 moments per parameter: 8 bytes/param of optimizer state, the "K=12"
(with the fp32 master copy) of the ZeRO paper's memory accounting.

Schedule: linear warmup from 0 to `lr` over `warmup_steps` (large early updates from
Adam's poorly-estimated second moment destabilize training; Goyal et al. 2017 §2.2), then
cosine decay (Loshchilov & Hutter 2017, eq. 5) to `lr·min_lr_ratio` at `decay_steps`,
flat after that:

    lr(t) = lr · (t+1)/W                                          t < W
    lr(t) = lr_min + ½(lr - lr_min)(1 + cos(π·(t-W)/(D-W)))       W <= t < D
    lr(t) = lr_min                                                t >= D
"""
from __future__ import annotations

import math

import torch

from ltk.training.config import OptimConfig


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    # The fused CUDA implementation does the whole update in a few kernels; on a CPU the
    # multi-tensor "foreach" path is the fast one. Both give the same math.
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        param_groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    warmup = max(0, cfg.warmup_steps)
    decay_end = cfg.decay_steps if cfg.decay_steps is not None else max_steps
    lr_min = cfg.lr * cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if step >= decay_end or decay_end <= warmup:
        return lr_min
    progress = (step - warmup) / (decay_end - warmup)
    return lr_min + 0.5 * (cfg.lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
