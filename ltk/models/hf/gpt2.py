"""GPT-2 <-> transformers' GPT2LMHeadModel / GPT2Model.

transformers keeps OpenAI's `Conv1D` layers, which compute y = x·W + b with W of shape
(in, out): the transpose of nn.Linear's (out, in). Everything else (embeddings, LayerNorms,
biases) maps one to one:

    ours                      transformers
    wte.weight                transformer.wte.weight   (also the tied lm_head.weight)
    wpe.weight                transformer.wpe.weight
    h.{i}.attn.c_attn.weight  transformer.h.{i}.attn.c_attn.weight   transposed
    h.{i}.{ln_1,ln_2}.*       transformer.h.{i}.{ln_1,ln_2}.*
    ln_f.*                    transformer.ln_f.*

Checkpoints of the bare GPT2Model (OpenAI's own release among them) have no "transformer."
prefix; older ones also carry `attn.bias` / `attn.masked_bias`, which are the causal-mask
buffers, not parameters, and are dropped by name.
"""
from __future__ import annotations

import re

import torch

from ltk.models.gpt import GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def config_from_hf(d: dict) -> GPTConfig:
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json activation_function={act!r}: our GPT uses the tanh GELU (gelu_new)")
    n_embd = d["n_embd"]
    if d.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"config.json n_inner={d['n_inner']}: our GPT's MLP is 4 x n_embd = {4 * n_embd}")
    if abs(d.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"config.json layer_norm_epsilon={d['layer_norm_epsilon']}: our GPT uses 1e-5")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if d.get(flag):
            raise ValueError(f"config.json {flag}=true is not supported by our GPT")
    if d.get("tie_word_embeddings", True) is False:
        raise ValueError("config.json tie_word_embeddings=false: our GPT ties the head to the embedding")
    return GPTConfig(vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"],
                     n_head=d["n_head"], n_embd=n_embd, dropout=d.get("resid_pdrop", 0.0), bias=True)


def config_to_hf(cfg: GPTConfig) -> dict:
    if not cfg.bias:
        raise ValueError("transformers' GPT-2 always has biases: a model with bias=False cannot be exported")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "initializer_range": 0.02,
    }


def _expected(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our tensor names and shapes (the tied head is stored once, as wte)."""
    d, out = cfg.n_embd, {"wte.weight": (cfg.vocab_size, cfg.n_embd), "wpe.weight": (cfg.block_size, cfg.n_embd)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = out[p + ln + ".bias"] = (d,)
        for name, (o, n_in) in {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d),
                                "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d)}.items():
            out[p + name + ".weight"], out[p + name + ".bias"] = (o, n_in), (o,)
    out["ln_f.weight"] = out["ln_f.bias"] = (d,)
    return out


def check_tensors(got: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Strict: every expected tensor present with its shape, nothing else."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: {tuple(got[k].shape)} != {expected[k]}"
             for k in expected if k in got and tuple(got[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"shape mismatches {wrong[:8]}")


def state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        key = name.removeprefix("transformer.")
        if _MASK_BUFFER.search(key) or key == "lm_head.weight":  # buffers; the head is tied to wte
            continue
        out[key] = t.t().contiguous() if key.endswith(_CONV1D) else t
    check_tensors(out, _expected(cfg), "GPT-2 checkpoint")
    head = tensors.get("lm_head.weight")
    if head is not None and not torch.equal(head, out["wte.weight"]):
        raise ValueError("GPT-2 checkpoint: lm_head.weight differs from wte.weight, but GPT-2 ties them")
    return out


def state_dict_to_hf(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    ours = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    check_tensors(ours, _expected(cfg), "our GPT state dict")
    out = {"transformer." + k: (v.t().contiguous() if k.endswith(_CONV1D) else v) for k, v in ours.items()}
    out["lm_head.weight"] = ours["wte.weight"]
    return out
