"""T5's span-corruption objective (Raffel et al. 2020, §3.1.4 and §3.3.4, Figure 2).

Pick noise spans covering a fraction `noise_density` (15%) of the n tokens, of mean length
`mean_span_length` (3); replace each span in the input by one sentinel token, and ask the decoder
for the dropped spans, each after its sentinel:

    original  Thank you for inviting me to your party last week .
    inputs    Thank you <X> me to your party <Y> week . </s>
    targets   <X> for inviting <Y> last <Z> </s>

How the spans are chosen (T5's `random_spans_noise_mask`):

    n_noise  = round(n · noise_density), clamped to [1, n − 1]
    n_spans  = max(1, round(n_noise / mean_span_length))
    noise span lengths     = a random segmentation of n_noise tokens into n_spans positive parts
    non-noise span lengths = a random segmentation of n − n_noise tokens into n_spans positive parts
    the sequence is: keep_0, noise_0, keep_1, noise_1, ..., keep_{k−1}, noise_{k−1}

A random segmentation of m items into k positive parts chooses the k − 1 cut points uniformly
among the m − 1 gaps (a random permutation of k − 1 ones and m − k zeros, cumulative sum).
So the sequence always starts with kept tokens and ends with a noise span, as in T5.

Our exact convention (T5's, with its EOS appended to both sides):
    inputs  = keep_0, s_0, keep_1, s_1, ..., keep_{k−1}, s_{k−1}, eos
    targets = s_0, noise_0, s_1, noise_1, ..., s_{k−1}, noise_{k−1}, s_k, eos
with s_i = sentinel_ids[i]; the closing sentinel s_k marks the end of the last span (Figure 2's
<Z>), so k + 1 sentinels are needed. T5's vocabulary puts its 100 sentinels <extra_id_i> at the
top: s_i = V − 1 − i (`t5_sentinel_ids`). Targets are on average ~(0.15 + 2·0.05) n long: shorter
than the inputs, which is what makes this objective cheaper than predicting every token.
"""
from __future__ import annotations

import torch

from ltk.models.t5 import span_counts


def t5_sentinel_ids(vocab_size: int, count: int = 100) -> list[int]:
    """T5's convention: sentinel i (<extra_id_i>) is token vocab_size − 1 − i."""
    if not 0 < count <= vocab_size:
        raise ValueError(f"count must be in [1, vocab_size={vocab_size}], got {count}")
    return [vocab_size - 1 - i for i in range(count)]


def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths (num_segments,) of a uniformly random split of num_items into positive parts."""
    cuts = torch.zeros(num_items - 1, dtype=torch.long)
    cuts[: num_segments - 1] = 1
    cuts = cuts[torch.randperm(num_items - 1, generator=generator)]  # which gaps start a new segment
    segment_id = torch.cat([torch.zeros(1, dtype=torch.long), cuts.cumsum(0)])  # (num_items,)
    return torch.bincount(segment_id, minlength=num_segments)


def noise_span_lengths(n: int, *, noise_density: float, mean_span_length: float,
                       generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(kept span lengths, noise span lengths), alternating kept/noise, kept first."""
    n_noise, n_spans = span_counts(n, noise_density, mean_span_length)
    noise = _random_segmentation(n_noise, n_spans, generator)
    keep = _random_segmentation(n - n_noise, n_spans, generator)
    return keep.tolist(), noise.tolist()


def span_corrupt(tokens, *, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 sentinel_ids, eos_id: int, generator: torch.Generator | None = None):
    """One sequence (1-D list or tensor of token ids, n >= 2) -> (inputs, targets) as 1-D long
    tensors, in the convention of the module docstring. Deterministic for a seeded generator."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    keep, noise = noise_span_lengths(n, noise_density=noise_density, mean_span_length=mean_span_length,
                                     generator=generator)
    sentinel_ids = list(sentinel_ids)
    if len(sentinel_ids) < len(noise) + 1:
        raise ValueError(f"{len(noise)} noise spans need {len(noise) + 1} sentinel ids, got {len(sentinel_ids)}")
    inputs, targets = [], []
    start = 0
    for i, (k, m) in enumerate(zip(keep, noise)):
        sentinel = torch.tensor([sentinel_ids[i]])
        inputs += [tokens[start:start + k], sentinel]
        targets += [sentinel, tokens[start + k:start + k + m]]
        start += k + m
    eos = torch.tensor([eos_id])
    inputs.append(eos)
    targets += [torch.tensor([sentinel_ids[len(noise)]]), eos]
    return torch.cat(inputs), torch.cat(targets)
