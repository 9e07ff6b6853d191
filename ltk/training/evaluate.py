"""Validation loss and bits per byte.

Loss is the mean cross-entropy in nats per *token*, which depends on the tokenizer: a
tokenizer with bigger tokens has fewer, harder predictions. Bits per byte removes that
dependence by charging the same total information to the raw UTF-8 text:

    bpb = (Σ_t -ln p(y_t | y_<t)) / ln 2 / (Σ_t bytes(y_t))

summed over the same target tokens, where bytes(y) is how many UTF-8 bytes token y
stands for (Tokenizer.token_byte_lengths). Special tokens (end-of-text) stand for no bytes;
they are left out of both sums, so the figure is comparable across tokenizers and with
the n-gram baselines of ltk/labs/pretrain.py, which use the same rule.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], object] = nullcontext,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    objective=None,
    seed: int = 0,
    first_index: int = 0,
    index_step: int = 1,
    eval_sums: Callable | None = None,
    discard: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
) -> dict[str, float]:
    """Return {"val_loss": nats per predicted token, "val_bpb": bits/byte (causal LM only),
    "val_tokens"}.

    `token_bytes`: (vocab,) int tensor of UTF-8 bytes per token id. `objective`: how a batch
    becomes a loss (ltk/training/objectives.py; default: causal LM). Masks and spans drawn by an
    objective use generators seeded by `seed` and the batch index, so every evaluation scores
    the same task. `all_reduce`, when given, sums the partial sums over data-parallel ranks so
    every rank gets the global figure. A rank that scores batches first_index, first_index +
    index_step, ... of the full list says so, so its masks are those of one process.

    Sharded models (ltk/parallel/sharded_eval.py): `eval_sums(model, x, y, gen, token_bytes)`
    replaces the objective's scoring (tensor or pipeline parallelism), and the `discard` batches
    are run and their result dropped, so that every rank makes as many forward calls (with their
    collectives) as the rank with the most batches."""
    from ltk.training.objectives import CausalLM, step_generator

    objective = objective or CausalLM(0, 0)
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    score = eval_sums or objective.eval_sums
    batches = list(batches)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats(bytes>0), bytes
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with autocast():
            gen = step_generator(seed, 0, first_index + i * index_step, 0)
            sums += score(model, x, y, gen, token_bytes)
    for x, y in discard:  # lockstep padding: the collectives run, the result is dropped
        x, y = x.to(device), y.to(device)
        with autocast():
            score(model, x, y, step_generator(seed, 0, first_index, 0), token_bytes)
    if all_reduce is not None:
        sums = all_reduce(sums)
    if was_training:
        model.train()
    nats, tokens, nats_counted, nbytes = sums.tolist()
    if tokens == 0:
        raise ValueError("evaluation got no batches: the validation split is empty or eval_batches is 0 "
                         "(or smaller than the number of ranks)")
    out = {"val_loss": nats / tokens, "val_tokens": int(tokens)}
    if objective.has_bpb:
        out["val_bpb"] = nats_counted / math.log(2) / max(nbytes, 1.0)
    return out
