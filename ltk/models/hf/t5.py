"""T5 checkpoints of transformers' `T5ForConditionalGeneration`, in and out (ltk/models/t5.py).

Every tensor keeps its layout (nn.Linear is (out, in) on both sides); only the names change:

    ours                                           transformers
    shared.weight                                  shared.weight  (+ encoder/decoder.embed_tokens.weight,
                                                                     and lm_head.weight when tied: aliases)
    encoder.relative_bias.weight                   encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    encoder.blocks.{i}.attn_norm.weight            encoder.block.{i}.layer.0.layer_norm.weight
    encoder.blocks.{i}.attn.{q,k,v,o}.weight       encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    encoder.blocks.{i}.ff_norm.weight              encoder.block.{i}.layer.1.layer_norm.weight
    encoder.blocks.{i}.ff.{wi,wo}.weight           encoder.block.{i}.layer.1.DenseReluDense.{wi,wo}.weight
                        {wi_0,wi_1,wo}  (1.1)                                               {wi_0,wi_1,wo}
    encoder.final_norm.weight                      encoder.final_layer_norm.weight
    decoder: as the encoder, with the cross-attention as layer.1 (EncDecAttention) and the FF as layer.2
    lm_head.weight (untied only)                   lm_head.weight

The relative bias table lives once per stack in ours (it is shared by all blocks) and in block 0 of
transformers. Old checkpoints also carry an unused decoder.block.0.layer.1.EncDecAttention
.relative_attention_bias.weight (transformers ignores it on load); it is dropped here too.

Tied or not, two conventions. Before transformers 5, tie_word_embeddings told T5 1.0 (True: the head
is the embedding, with the d^-1/2 rescale) from 1.1 (False: a head of its own, no rescale).
transformers ≥ 5 always writes tie_word_embeddings=True, keeps the 1.0/1.1 distinction in
`scale_decoder_outputs`, and ties the head to the embedding whenever the file has no
lm_head.weight (so a 1.1 model that transformers built itself is written without one).
`config_from_hf` reads scale_decoder_outputs when present, else tie_word_embeddings, and picks our
tied head (1.0) or untied head (1.1); `state_dict_from_hf` gives an untied head that the file
leaves out the embedding's values, as transformers does, so the logits agree. (Our untied head is
then a copy: fine-tuned here it trains apart from the embedding, and transformers loads the two
back apart.) An untied head with the rescale has no counterpart in our T5 and is refused.
`config_to_hf` writes both fields, so either generation of transformers reads our folders right.
"""
from __future__ import annotations

import torch

from ltk.models.t5 import T5Config

_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_FEED_FORWARDS = {"relu": "relu", "gated-gelu": "gated-gelu"}


def config_from_hf(hf: dict) -> T5Config:
    if hf.get("model_type", "t5") != "t5":
        raise ValueError(f"model_type: expected 't5', got {hf.get('model_type')!r}")
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FEED_FORWARDS:
        raise ValueError(f"feed_forward_proj={ff!r} is not supported: only {sorted(_FEED_FORWARDS)}")
    if ff == "gated-gelu" and hf.get("dense_act_fn", "gelu_new") != "gelu_new":
        raise ValueError(f"dense_act_fn={hf['dense_act_fn']!r} is not supported with gated-gelu: only 'gelu_new'")
    if hf.get("is_decoder", False):
        raise ValueError("is_decoder=True (a decoder-only T5) is not supported")
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))  # the rescale marks 1.0
    if not isinstance(tied, bool):
        raise ValueError(f"scale_decoder_outputs / tie_word_embeddings must be true or false, got {tied!r}")
    n_layer = hf.get("num_layers", 6)
    return T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
        n_layer=n_layer, n_decoder_layer=hf.get("num_decoder_layers") or n_layer, n_head=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout=hf.get("dropout_rate", 0.1), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward=ff, tie_embeddings=bool(tied),
    )


def config_to_hf(cfg: T5Config) -> dict:
    cfg.validate()
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layer, "num_decoder_layers": cfg.n_decoder_layer, "num_heads": cfg.n_head,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": cfg.feed_forward,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.tie_embeddings,
        "is_encoder_decoder": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }


def _name_pairs(cfg: T5Config) -> list[tuple[str, str]]:
    """(our name, transformers' name) for every tensor but the embedding aliases."""
    ff = ("wi_0", "wi_1", "wo") if cfg.feed_forward == "gated-gelu" else ("wi", "wo")
    pairs = [("shared.weight", "shared.weight")]
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        pairs.append((f"{stack}.relative_bias.weight",
                      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        for i in range(n):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            sublayers = [("attn", "SelfAttention", 0)]
            if stack == "decoder":
                sublayers.append(("cross_attn", "EncDecAttention", 1))
            for mod, hf_mod, j in sublayers:
                norm = "attn_norm" if mod == "attn" else "cross_norm"
                pairs.append((f"{ours}.{norm}.weight", f"{theirs}.{j}.layer_norm.weight"))
                pairs += [(f"{ours}.{mod}.{p}.weight", f"{theirs}.{j}.{hf_mod}.{p}.weight") for p in "qkvo"]
            j = len(sublayers)
            pairs.append((f"{ours}.ff_norm.weight", f"{theirs}.{j}.layer_norm.weight"))
            pairs += [(f"{ours}.ff.{p}.weight", f"{theirs}.{j}.DenseReluDense.{p}.weight") for p in ff]
        pairs.append((f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight"))
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def _expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Our name -> shape."""
    d, inner, V = cfg.d_model, cfg.n_head * cfg.d_kv, cfg.vocab_size
    shapes = {}
    for ours, _ in _name_pairs(cfg):
        last = ours.split(".")[-2]
        shapes[ours] = {
            "shared": (V, d), "lm_head": (V, d),
            "relative_bias": (cfg.relative_attention_num_buckets, cfg.n_head),
            "q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner),
            "wi": (cfg.d_ff, d), "wi_0": (cfg.d_ff, d), "wi_1": (cfg.d_ff, d), "wo": (d, cfg.d_ff),
        }.get(last, (d,))  # the RMSNorm gains
    return shapes


def _rename(tensors: dict, pairs: list[tuple[str, str]], shapes: dict, side: str) -> dict:
    """Strict renaming src -> dst; `pairs` are (src, dst), `shapes` keyed by the dst name or src name."""
    missing = [src for src, _ in pairs if src not in tensors]
    unexpected = sorted(set(tensors) - {src for src, _ in pairs})
    wrong = [f"{src} {tuple(tensors[src].shape)} (expected {shapes[src]})"
             for src, _ in pairs if src in tensors and tuple(tensors[src].shape) != shapes[src]]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"{side} T5 state dict does not match the config — " + " | ".join(problems))
    return {dst: tensors[src] for src, dst in pairs}


def state_dict_from_hf(tensors: dict, cfg: T5Config) -> dict:
    """transformers' tensors -> ours. The embedding aliases (and lm_head.weight when tied) may be
    present or absent; when present they must equal shared.weight. An untied head that the file
    leaves out is the embedding (transformers >= 5 ties it)."""
    tensors = dict(tensors)
    aliases = _EMBED_ALIASES + (("lm_head.weight",) if cfg.tie_embeddings else ())
    if "shared.weight" not in tensors:  # some exports keep only an alias of the embedding
        for name in _EMBED_ALIASES:
            if name in tensors:
                tensors["shared.weight"] = tensors[name]
                break
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors and "shared.weight" in tensors:
        # transformers >= 5 ties the head whenever the file leaves it out (module docstring)
        tensors["lm_head.weight"] = tensors["shared.weight"].clone()
    for name in aliases:
        if name in tensors:
            alias = tensors.pop(name)
            shared = tensors.get("shared.weight")
            if shared is not None and (alias.shape != shared.shape or not torch.equal(alias, shared)):
                raise ValueError(f"{name} differs from shared.weight, but the config ties them (an untied "
                                 "head with the d^-1/2 rescale is not supported)"
                                 if name == "lm_head.weight" else f"{name} differs from shared.weight")
    for name in _IGNORED:
        tensors.pop(name, None)
    pairs = [(hf, ours) for ours, hf in _name_pairs(cfg)]
    ours_shapes = _expected_shapes(cfg)
    shapes = {hf: ours_shapes[ours] for hf, ours in pairs}
    return _rename(tensors, pairs, shapes, "transformers'")


def state_dict_to_hf(tensors: dict, cfg: T5Config) -> dict:
    """Our tensors -> transformers' names, with the embedding aliases that transformers' own
    state_dict() lists (the same tensor object, so saving code can deduplicate them)."""
    out = _rename(dict(tensors), _name_pairs(cfg), _expected_shapes(cfg), "our")
    for name in _EMBED_ALIASES + (("lm_head.weight",) if cfg.tie_embeddings else ()):
        out[name] = out["shared.weight"]
    return out
