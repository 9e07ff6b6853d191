"""The masked-language-model objective of BERT (Devlin et al. 2019, §3.1 "Task #1: Masked LM").

A bidirectional encoder sees the whole sequence, so predicting the next token would be
trivial. Instead a random 15% of the positions are chosen, corrupted, and predicted from
their context:

    chosen_i ~ Bernoulli(p)            p = 0.15, and 0 for special tokens ([CLS], [SEP], padding)
    of the chosen positions:
        80%  -> [MASK]                 x̃_i = mask_id
        10%  -> a random token         x̃_i ~ Uniform(non-special vocabulary)
        10%  -> unchanged              x̃_i = x_i
    label_i = x_i if chosen_i else -100   (-100: ignored by F.cross_entropy)

    loss = CE(logits(x̃), label)         averaged over the chosen positions only

Why not always [MASK]: [MASK] never occurs when the model is fine-tuned, so the 10% random
and 10% unchanged keep the model from relying on it; the encoder has to keep a good
representation of every token, since any one may be a target (BERT §3.1 and appendix C.2).

The released pre-processing picked exactly round(15% · length) positions per sequence; here
each position is chosen independently (as transformers' data collator does), so the count
varies around 15%. The random replacement is drawn from the non-special ids only, so it
never inserts a [MASK], [CLS] or padding token.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, mask_id: int, special_ids: Iterable[int] = (),
                mlm_probability: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt `input_ids` (any shape, integer ids) for masked-LM training.

    Returns (inputs, labels), both of input_ids' shape: inputs with the chosen positions
    replaced (80% mask_id, 10% a random non-special token, 10% unchanged), labels holding
    the original id at the chosen positions and -100 elsewhere. Positions holding one of
    `special_ids` (or mask_id) are never chosen. The same generator state gives the same
    result; `generator` must live on input_ids' device.
    """
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold integer ids (int32/int64), got {input_ids.dtype}")
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {vocab_size})")
    specials = sorted({int(i) for i in special_ids} | {mask_id})
    dev = input_ids.device
    special_t = torch.tensor(specials, dtype=input_ids.dtype, device=dev)
    is_special = torch.isin(input_ids, special_t)

    # 1. choose positions: each with probability p, never a special token
    chosen = (torch.rand(input_ids.shape, generator=generator, device=dev) < mlm_probability) & ~is_special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # 2. one more uniform draw r per position splits the chosen ones 80 / 10 / 10:
    #    r < 0.8 -> [MASK],  0.8 <= r < 0.9 -> random token,  r >= 0.9 -> unchanged
    r = torch.rand(input_ids.shape, generator=generator, device=dev)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)

    allowed = torch.ones(vocab_size, dtype=torch.bool, device=dev)
    allowed[special_t[special_t < vocab_size].long()] = False
    allowed_ids = allowed.nonzero().squeeze(1).to(input_ids.dtype)  # the non-special vocabulary
    if len(allowed_ids) == 0:
        raise ValueError("every id of the vocabulary is special: no random replacement to draw")
    pick = torch.randint(len(allowed_ids), input_ids.shape, generator=generator, device=dev)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, allowed_ids[pick], inputs)
    return inputs, labels
