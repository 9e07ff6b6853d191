"""Validation loss and bits per byte.

Loss is the mean cross-entropy in nats per *token*, which depends on the tokenizer: a
tokenizer with bigger tokens has fewer, harder predictions. Bits per byte removes that
dependence by charging the same total information to the raw UTF-8 text:

    bpb = (Σ_t -ln p(y_t | y_<t)) / ln 2 / (Σ_t bytes(y_t))

summed over the same target tokens, where bytes(y) is how many UTF-8 bytes token y
stands for (Tokenizer.token_byte_lengths). Special tokens (end-of-text) stand for no bytes;
they are left out of both sums, so the figure is comparable across tokenizers and with
the n-gram baselines of labs/pretrain.py, which use the same rule.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], object] = nullcontext,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Return {"val_loss": nats/token over all targets, "val_bpb": bits/byte, "val_tokens"}.

    `token_bytes`: (vocab,) int tensor of UTF-8 bytes per token id. `all_reduce`, when
    given, sums the partial sums over data-parallel ranks so every rank gets the global
    figure."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats(bytes>0), bytes
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
        nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        nbytes = token_bytes[y.view(-1)]
        counted = nbytes > 0
        sums += torch.stack([
            nats.sum().double(),
            torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
            nats[counted].sum().double(),
            nbytes.sum().double(),
        ])
    if all_reduce is not None:
        sums = all_reduce(sums)
    if was_training:
        model.train()
    nats, tokens, nats_counted, nbytes = sums.tolist()
    if tokens == 0:
        raise ValueError("evaluation got no batches: the validation split is empty or eval_batches is 0")
    return {
        "val_loss": nats / tokens,
        "val_bpb": nats_counted / math.log(2) / max(nbytes, 1.0),
        "val_tokens": int(tokens),
    }
