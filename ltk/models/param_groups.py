"""AdamW parameter groups shared by every model of the zoo."""
from __future__ import annotations

import torch


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on the matrices (2-D weights, embeddings included), none
    on biases and norm gains, which have no scale to regularize (Loshchilov & Hutter 2019
    decouple the decay; BERT's and GPT-2's recipes exclude the same vectors). A tied weight
    appears once: `parameters()` yields each tensor one time."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
