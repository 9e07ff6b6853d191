"""`attn_implementation="ltk"`: our attention kernel (ltk/kernels/attention.py) behind transformers'
attention interface, so that any transformers model written against it can run on it:

    import ltk, transformers
    ltk.register_hf_attention()          # once per process (ltk.patch calls it too)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ltk")

Registration is explicit, not a side effect of `import ltk`: importing ltk must stay free of
torch and transformers (`ltk --help` starts in a fraction of a second).

transformers (>= 4.48, here 5.x) calls an attention function as

    fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) -> (out, weights)

with query (B, H, T, D), key/value (B, H_kv, S, D) (grouped-query attention when H_kv < H: our kernel
reads head h // (H / H_kv) itself, nothing is repeated), and out (B, T, H, D). The mask is made by the
mask function registered under the same name; ours is transformers' `sdpa_mask`: None when causality
(module.is_causal) or nothing at all says everything, else a boolean (B, 1, T, S), True = attend. Our
kernel takes causality and a key padding mask (B, S) instead of a (T, S) matrix, so a boolean mask is
read back into those two when it is exactly

    allowed(b, i, j) = kpm[b, j]  and  (not causal  or  j <= i + S - T)

(kpm is the mask's last query row, which sees every key it may under either form); that covers
causal LMs with padding and encoders with padding, and is checked element by element, once per mask
tensor (the same mask goes to every layer). Any other mask (packed sequences found from position_ids,
custom 4-D masks, float additive masks) is passed as an additive bias: 0 / −inf for a boolean mask,
as is for a float one; right, but it reads a (B, T, S) tensor in every layer (a one-time warning says
so). What the kernel has no option for falls back to transformers' SDPA function with a one-time
warning naming the reason: attention dropout in training (GPT-2 and BERT configs default to 0.1),
soft-capping, sliding windows, a T5-style position bias. The kernel returns no attention weights (as
SDPA); fully masked query rows give 0 (SDPA may give NaN there).

The backend: "auto" (Triton on CUDA, PyTorch's SDPA elsewhere), or what `ltk.patch(model,
backend=...)` set on the attention modules (`module._ltk_backend`).
"""
from __future__ import annotations

import warnings

import torch

from ltk.kernels.attention import MAX_HEAD_DIM, attention

NAME = "ltk"
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def register_hf_attention() -> str:
    """Register our attention (and its mask function) with transformers under the name "ltk";
    returns the name. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, ltk_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # without one, transformers passes no mask: padding lost
    return NAME


def _fallback_reason(module, query, dropout, kwargs) -> str | None:
    if dropout and module.training:
        return f"attention dropout p={dropout} (our kernel has none; set the config's attention dropout to 0)"
    for key in ("softcap", "sliding_window", "position_bias", "s_aux"):
        if kwargs.get(key) is not None:
            return f"{key} (not an option of our kernel)"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _from_bool_mask(mask: torch.Tensor, B: int, T: int, S: int, causal: bool):
    """(causal, key_padding_mask or None) when the boolean mask is causality and/or key padding
    alone, else None. mask broadcasts to (B, 1, T, S)."""
    m = mask.expand(B, 1, T, S)[:, 0]  # (B, T, S)
    kpm = m[:, -1, :]  # (B, S): the last query row may see every key either form allows
    j = torch.arange(S, device=mask.device)
    tril = j[None, :] <= torch.arange(T, device=mask.device)[:, None] + (S - T)  # (T, S), bottom-right
    for c in (causal, not causal):
        allowed = kpm[:, None, :] & tril if c else kpm[:, None, :].expand(B, T, S)
        if torch.equal(allowed, m):
            return c, None if bool(kpm.all()) else kpm.contiguous()
    return None


def _kernel_mask(mask: torch.Tensor, B: int, T: int, S: int, causal: bool, dtype: torch.dtype):
    """(causal, key_padding_mask, bias) for our kernel, converted once per mask tensor (cached on it)."""
    key = (B, T, S, causal, dtype)  # transformers never edits a mask in place
    cached = getattr(mask, "_ltk_converted", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D (B, 1|H, T, S) here, got shape {tuple(mask.shape)}")
    found = _from_bool_mask(mask, B, T, S, causal) if mask.dtype == torch.bool and mask.shape[1] == 1 else None
    if found is not None:
        result = (found[0], found[1], None)
    else:
        _warn_once("bias", "ltk attention: an attention mask that is not causality plus key padding (packed "
                   "sequences, a custom 4-D or float mask) runs as an additive bias, which reads a (B, T, S) "
                   "tensor in every layer")
        bias = mask.to(dtype) if mask.dtype != torch.bool else \
            torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        result = (False, None, bias)
    mask._ltk_converted = (key, result)
    return result


def ltk_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, computed by ltk.kernels.attention.
    query (B, H, T, D), key/value (B, H_kv, S, D) -> ((B, T, H, D), None)."""
    reason = _fallback_reason(module, query, dropout, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _warn_once(reason, f"ltk attention falls back to transformers' sdpa for {reason}")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, _, T, _ = query.shape
    S = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kpm = bias = None
    if attention_mask is None:
        # as transformers' sdpa: one query (decoding) sees every key; a causal prefill into an empty
        # static cache keeps the first T keys (the rest are not written yet)
        causal = bool(causal) and T > 1
        if causal and S > T:
            key, value = key[:, :, :T], value[:, :, :T]
    else:
        causal, kpm, bias = _kernel_mask(attention_mask, B, T, S, bool(causal), query.dtype)
    out = attention(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=kpm, bias=bias,
                    backend=getattr(module, "_ltk_backend", "auto"))  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)
