"""Autoregressive sampling from a decoder-only model.

    for each new position:  p = softmax(logits[-1] / temperature)  restricted to the top k
                            x_next ~ p;  append x_next

Temperature < 1 sharpens the distribution (towards greedy decoding at 0), > 1 flattens it;
top-k sampling (Fan et al. 2018) drops the long tail of unlikely tokens. This version
re-runs the whole context each step (O(T²) work per token); a KV cache removes that.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    block_size: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """idx: (B, T) prompt ids -> (B, T + n) with n <= max_new_tokens new ids."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if idx.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]  # the model sees at most block_size positions
        logits = model(context)[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
    model.train(was_training)
    return idx
