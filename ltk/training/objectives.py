"""Pre-training objectives: how a window of tokens becomes a loss, per model family.

    causal LM        (GPT, Llama)   predict token t+1 from tokens ≤ t:  L = CE(model(x), y), y = x shifted
    masked LM        (BERT)         Devlin et al. 2019 §3.1: 15% of positions chosen; 80% -> [MASK],
                                    10% -> random, 10% kept; L = CE on the chosen positions only
    span corruption  (T5)           Raffel et al. 2020 §3.1.4: 15% of tokens in spans of mean length 3
                                    replaced by sentinels; the decoder writes the dropped spans
    instruct         (GPT, Llama)   fine-tuning: CE on the response tokens only (prompt labels -100,
                                    ltk/training/instruct.py), packed rows kept apart by segment ids

Our tokenizers have one special token (end-of-text). The objectives that need more take
ids above the tokenizer's vocabulary (`extra_tokens`), so the model's vocabulary is the
tokenizer's plus those: BERT's [MASK] is id V; T5's padding / decoder-start is id V and its
100 sentinels are V+100 down to V+1 (T5's convention: sentinel i = vocab − 1 − i).

The loss is the model's own: it is called with the targets and its head scores them, building
the logits or not as `model.loss` says (ltk/models/lm_head.py: full, fused, auto). Evaluation
takes the logits (it needs each token's loss, for bits per byte).

Randomness (which tokens are masked or dropped) comes from a generator seeded by the step,
the micro-batch and the rank, never from the global RNG: a resumed run draws the same masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ltk.training.mlm import mask_tokens
from ltk.training.span_corruption import span_corrupt, t5_sentinel_ids


class CausalLM:
    name, extra_tokens, has_bpb = "causal-lm", 0, True

    def __init__(self, tokenizer_vocab: int, eot_id: int):
        pass

    def loss(self, model, x, y, gen: torch.Generator) -> torch.Tensor:
        return model(x, targets=y)  # the head scores it: full logits or fused (ltk/models/lm_head.py)

    def eval_sums(self, model, x, y, gen, token_bytes) -> torch.Tensor:
        """[Σ nats, #targets, Σ nats over targets that stand for bytes, Σ bytes] (evaluate.py)."""
        logits = model(x)
        nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="none")
        nbytes = token_bytes[y.view(-1)]
        return torch.stack([nats.sum().double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=x.device),
                            nats[nbytes > 0].sum().double(), nbytes.sum().double()])


class _Seq2Loss:
    """Objectives scored only on chosen positions: no bits-per-byte (the prediction task is
    not "the next byte of the text")."""

    has_bpb = False

    def eval_sums(self, model, x, y, gen, token_bytes) -> torch.Tensor:
        args, kwargs, labels = self.inputs(x, gen)
        logits = model(*args, **kwargs)
        nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction="sum")
        count = (labels != -100).sum().double()
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return torch.stack([nats.double(), count, zero, zero])

    def loss(self, model, x, y, gen: torch.Generator) -> torch.Tensor:
        args, kwargs, labels = self.inputs(x, gen)
        return model(*args, **kwargs, targets=labels)  # mean over labels != -100 (ltk/models/lm_head.py)

    def forward(self, model, x, gen):
        """(logits, labels) of one batch."""
        args, kwargs, labels = self.inputs(x, gen)
        return model(*args, **kwargs), labels


class MaskedLM(_Seq2Loss):
    name, extra_tokens = "masked-lm", 1

    def __init__(self, tokenizer_vocab: int, eot_id: int):
        self.vocab, self.mask_id, self.eot_id = tokenizer_vocab, tokenizer_vocab, eot_id

    def inputs(self, x, gen):
        """The model's arguments and the labels (B, T) of one batch of windows x (B, T)."""
        inputs, labels = mask_tokens(x.cpu(), vocab_size=self.vocab + 1, mask_id=self.mask_id,
                                     special_ids=(self.eot_id,), generator=gen)  # drawn on the CPU generator
        return (inputs.to(x.device),), {}, labels.to(x.device)


class SpanCorruption(_Seq2Loss):
    name, extra_tokens = "span-corruption", 101

    def __init__(self, tokenizer_vocab: int, eot_id: int):
        self.pad_id, self.eot_id = tokenizer_vocab, eot_id
        self.sentinels = t5_sentinel_ids(tokenizer_vocab + self.extra_tokens)

    def batch(self, x: torch.Tensor, gen: torch.Generator):
        """(B, T) windows -> padded encoder inputs, decoder inputs, their masks and labels."""
        pairs = [span_corrupt(row.cpu(), sentinel_ids=self.sentinels, eos_id=self.eot_id, generator=gen) for row in x]
        B, Ti, To = len(pairs), max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
        enc = torch.full((B, Ti), self.pad_id, dtype=torch.long)
        labels = torch.full((B, To), -100, dtype=torch.long)
        dec = torch.full((B, To), self.pad_id, dtype=torch.long)  # starts with pad, as T5
        enc_mask, dec_mask = torch.zeros(B, Ti, dtype=torch.bool), torch.zeros(B, To, dtype=torch.bool)
        for i, (inp, tgt) in enumerate(pairs):
            enc[i, :len(inp)], enc_mask[i, :len(inp)] = inp, True
            labels[i, :len(tgt)] = tgt
            dec[i, 1:len(tgt)], dec_mask[i, :len(tgt)] = tgt[:-1], True  # teacher forcing, shifted right
        return [t.to(x.device) for t in (enc, enc_mask, dec, dec_mask, labels)]

    def inputs(self, x, gen):
        enc, enc_mask, dec, dec_mask, labels = self.batch(x, gen)
        return (enc, dec), {"attention_mask": enc_mask, "decoder_attention_mask": dec_mask}, labels


class Instruct:
    """Instruction tuning: batches are (x, y) or packed (x, y, segments) with y = -100 on the
    prompt and padding, so the model's loss is the mean over the response tokens."""

    name, extra_tokens, has_bpb = "instruct", 0, False

    def loss(self, model, x, y, gen: torch.Generator, segments: torch.Tensor | None = None) -> torch.Tensor:
        return model(x, targets=y) if segments is None else model(x, targets=y, segments=segments)


def causal_loss(model, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy, from the logits, over the positions whose target is not -100 (the
    responses); segments: the (B, T) example ids of packed rows (ltk/training/packing.py)."""
    logits = model(x) if segments is None else model(x, segments=segments)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


OBJECTIVES = {"gpt": CausalLM, "llama": CausalLM, "bert": MaskedLM, "t5": SpanCorruption}


def objective_for(family: str, tokenizer_vocab: int, eot_id: int):
    return OBJECTIVES[family](tokenizer_vocab, eot_id)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, micro-batch, rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro * 101 + rank) % 2**63)
