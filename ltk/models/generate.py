"""Autoregressive sampling from a decoder-only model.

    for each new position:  z = logits[-1] / temperature
                            keep the top k tokens of z, then the smallest set of tokens
                            whose probability sums to at least top_p
                            x_next ~ softmax(z) over what is kept;  append x_next

Temperature < 1 sharpens the distribution (greedy decoding at 0), > 1 flattens it. Top-k
sampling (Fan et al. 2018) drops the long tail of unlikely tokens with a fixed count;
top-p, nucleus, sampling (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", §3.1, eq. 2) with a fixed probability mass, so the candidate set grows when
the model is unsure and shrinks when it is confident.

Two ways to run the model:
- without a cache: re-run the whole context (the last block_size tokens) every step,
  O(T²) work per new token. Works for any model mapping (B, T) ids to (B, T, V) logits.
- with a KV cache (models that have `new_cache`, e.g. ltk/models/llama.py): run the prompt
  once, then only the new token each step, attending to the cached keys and values. When
  the sequence outgrows the cache (block_size), the cache restarts on the last block_size
  tokens, which gives the same tokens as the uncached path.
"""
from __future__ import annotations

import math

import torch


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None = None, top_p: float | None = None,
                   context: int | None = None) -> None:
    """Refuse sampling settings outside their range, named as `ltk generate`'s flags.

    context: the model's block_size, the cap on max_new_tokens. Beyond it the window the model
    sees (the last block_size tokens) no longer holds any of the prompt, so further tokens
    would continue the model's own text rather than answer the prompt; and an unbounded count
    would run for as long as the number says.
    """
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
    if context is not None and max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: at most {context}, the model's context (block_size); "
                         "past it the prompt has left the window the model sees")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature {temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k {top_k}: must be >= 0 (0 = no top-k filter)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p {top_p}: must be in (0, 1]")  # no flag: the API only


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> the same with the tokens outside the top k / the nucleus top_p set to −inf
    (top_k None or 0: no top-k filter)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)  # (B, V) each
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the most likely token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    block_size: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    stop_token: int | None = None,
    stop_tokens: set[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool | None = None,
) -> torch.Tensor:
    """idx: (B, T) prompt ids -> (B, T + n) with n <= max_new_tokens new ids.

    A sequence that emits a stop token (stop_token, or any of stop_tokens) is finished: its
    later positions repeat that token, and generation ends when every sequence is finished.
    use_cache: None = use a KV cache when the model has one (`new_cache`).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if idx.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    stops = set(stop_tokens or ()) | ({stop_token} if stop_token is not None else set())
    stop_ids = torch.tensor(sorted(stops), dtype=idx.dtype, device=idx.device)
    if use_cache is None:
        use_cache = hasattr(model, "new_cache")
    was_training = model.training
    model.eval()
    B = idx.size(0)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    last = torch.zeros(B, 1, dtype=idx.dtype, device=idx.device)  # the stop token a finished row repeats
    cache = model.new_cache(B, min(block_size, idx.size(1) + max_new_tokens)) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(idx[:, -block_size:])  # the model sees at most block_size positions
        else:
            if idx.size(1) > cache.max_len:  # the window slid past the cache: start it again
                cache.reset()
            new = idx[:, cache.length:] if cache.length else idx[:, -cache.max_len:]  # not yet cached
            logits = model(new, kv_cache=cache)
        logits = logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        nxt = torch.where(finished, last, nxt)
        idx = torch.cat([idx, nxt], dim=1)
        if stops:
            just_stopped = torch.isin(nxt, stop_ids) & ~finished
            last = torch.where(just_stopped, nxt, last)
            finished |= just_stopped
            if bool(finished.all()):
                break
    model.train(was_training)
    return idx
