"""transformers' `LlamaForCausalLM` <-> ltk/models/llama.py, following ltk/models/hf/__init__.py.

Tensor names (layer i); every matrix has the same layout on both sides (nn.Linear's
(out, in)), so the conversion is a renaming only:

    ours                                 transformers
    tok_embeddings.weight                model.embed_tokens.weight
    layers.i.attn_norm.weight            model.layers.i.input_layernorm.weight
    layers.i.attn.wq / wk / wv / wo      model.layers.i.self_attn.q_proj / k_proj / v_proj / o_proj
    layers.i.mlp_norm.weight             model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.w1 / w3 / w2            model.layers.i.mlp.gate_proj / up_proj / down_proj
    norm.weight                          model.norm.weight
    output.weight                        lm_head.weight   (absent or equal to the embedding when tied)

No permutation of W_q, W_k is needed: both sides use the "rotate half" RoPE pairing (see
ltk/models/llama.py). Supported: plain RoPE (no rope_scaling), no biases, SiLU, head_dim = d / H.
"""
from __future__ import annotations

import torch

from ltk.models.llama import LlamaConfig

# (ours, transformers) per block, without the "layers.i." / "model.layers.i." prefixes
_BLOCK_NAMES = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
    ("mlp.w1.weight", "mlp.gate_proj.weight"),
    ("mlp.w3.weight", "mlp.up_proj.weight"),
    ("mlp.w2.weight", "mlp.down_proj.weight"),
]


def config_from_hf(d: dict) -> LlamaConfig:
    """A transformers LlamaConfig (as a config.json dict) -> LlamaConfig. Rejects what the
    model does not implement, naming the field."""
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type must be 'llama', got {d.get('model_type')!r}")
    if d.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling={d['rope_scaling']!r} is not supported (plain RoPE only)")
    rope = d.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type={rope['rope_type']!r} is not supported (plain RoPE only)")
    for field in ("attention_bias", "mlp_bias"):
        if d.get(field, False):
            raise ValueError(f"{field}=True is not supported (Llama has no biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (SwiGLU uses silu)")
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if field not in d:
            raise ValueError(f"the config has no {field}")
    d_model, n_head = d["hidden_size"], d["num_attention_heads"]
    if d.get("head_dim") not in (None, d_model // n_head):
        raise ValueError(f"head_dim={d['head_dim']} is not supported: it must be hidden_size / "
                         f"num_attention_heads = {d_model // n_head}")
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    cfg = LlamaConfig(
        vocab_size=d["vocab_size"],
        block_size=d.get("max_position_embeddings", 2048),
        n_layer=d["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head,
        n_embd=d_model,
        intermediate_size=d["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    cfg.validate()
    return cfg


def config_to_hf(cfg: LlamaConfig) -> dict:
    """LlamaConfig -> a dict that transformers.LlamaConfig(**d) accepts (a config.json)."""
    cfg.validate()
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _name_pairs(cfg: LlamaConfig) -> list[tuple[str, str]]:
    """(ours, transformers) for every tensor; a tied model has no separate output head."""
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layer):
        pairs += [(f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}") for ours, theirs in _BLOCK_NAMES]
    pairs.append(("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        pairs.append(("output.weight", "lm_head.weight"))
    return pairs


def _shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Our tensor names -> expected shapes."""
    d, I, V = cfg.n_embd, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    block = {"attn_norm.weight": (d,), "attn.wq.weight": (q, d), "attn.wk.weight": (kv, d),
             "attn.wv.weight": (kv, d), "attn.wo.weight": (d, q), "mlp_norm.weight": (d,),
             "mlp.w1.weight": (I, d), "mlp.w3.weight": (I, d), "mlp.w2.weight": (d, I)}
    shapes = {"tok_embeddings.weight": (V, d), "norm.weight": (d,), "output.weight": (V, d)}
    for i in range(cfg.n_layer):
        shapes.update({f"layers.{i}.{k}": s for k, s in block.items()})
    return shapes


def _convert(tensors: dict, pairs: list[tuple[str, str]], shapes: list[tuple[int, ...]],
             optional: set[str]) -> dict[str, torch.Tensor]:
    """Rename src -> dst for (src, dst) in pairs; strict about missing, unexpected and
    wrongly shaped tensors (the error lists every one). `optional` src names may be absent
    or present (a tied head) and are then dropped after a check that they equal their twin."""
    expected = {src for src, _ in pairs}
    missing = [src for src, _ in pairs if src not in tensors]
    unexpected = sorted(set(tensors) - expected - optional)
    wrong = [f"{src} {tuple(tensors[src].shape)} (expected {shape})"
             for (src, _), shape in zip(pairs, shapes)
             if src in tensors and tuple(tensors[src].shape) != shape]
    problems = [f"{what}: {', '.join(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    if problems:
        raise ValueError("checkpoint does not match the config; " + "; ".join(problems))
    return {dst: tensors[src] for src, dst in pairs}


def state_dict_from_hf(tensors: dict, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """transformers tensors (LlamaForCausalLM.state_dict() or the safetensors files) -> ours,
    for Llama(cfg).load_state_dict. With tied embeddings lm_head.weight may be absent; if
    present it must equal the embedding (the tied model has only one matrix)."""
    pairs = [(theirs, ours) for ours, theirs in _name_pairs(cfg)]
    shapes = [_shapes(cfg)[ours] for _, ours in pairs]
    out = _convert(tensors, pairs, shapes, _tied_extras(tensors, cfg, "lm_head.weight", "model.embed_tokens.weight"))
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def state_dict_to_hf(tensors: dict, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Ours (Llama.state_dict()) -> transformers names. A tied model writes lm_head.weight
    too (the same tensor), which transformers accepts and re-ties."""
    pairs = _name_pairs(cfg)
    shapes = [_shapes(cfg)[ours] for ours, _ in pairs]
    out = _convert(tensors, pairs, shapes, _tied_extras(tensors, cfg, "output.weight", "tok_embeddings.weight"))
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _tied_extras(tensors: dict, cfg: LlamaConfig, head: str, embedding: str) -> set[str]:
    """With tied embeddings the head tensor is allowed (and ignored) if it equals the embedding."""
    if not cfg.tie_embeddings or head not in tensors:
        return set()
    if embedding in tensors and tensors[head].shape == tensors[embedding].shape \
            and not torch.equal(tensors[head], tensors[embedding]):
        raise ValueError(f"tie_embeddings is set but {head} differs from {embedding}")
    return {head}
