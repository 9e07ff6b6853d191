"""BERT checkpoints in transformers' format <-> ltk/models/bert.py.

Two transformers classes are handled, told apart by `architectures` in config.json:

    BertForMaskedLM   tensors "bert.<encoder>" + "cls.predictions.*"  ->  Bert(mlm_head=True)
    BertModel         tensors "<encoder>" + "pooler.dense.*"          ->  Bert(mlm_head=False, pooler=True)

Names (HF -> ours), for layer i; Linear weights are (out, in) on both sides:

    embeddings.word_embeddings / position_embeddings / token_type_embeddings  wte / wpe / wtt
    embeddings.LayerNorm                                  ln_emb
    encoder.layer.i.attention.self.{query,key,value}      layers.i.attn.qkv   (concatenated on dim 0:
                                                          W_qkv = [W_q; W_k; W_v], (3d, d))
    encoder.layer.i.attention.output.dense / LayerNorm    layers.i.attn.proj / layers.i.ln_1
    encoder.layer.i.intermediate.dense                    layers.i.ffn.fc
    encoder.layer.i.output.dense / LayerNorm              layers.i.ffn.proj / layers.i.ln_2
    cls.predictions.transform.dense / LayerNorm           head.dense / head.ln
    cls.predictions.bias                                  head.bias
    cls.predictions.decoder.weight, .bias                 tied: wte.weight, head.bias (see below)
    pooler.dense                                          pooler

Tied tensors. The MLM decoder is the word embedding matrix and its bias is
`cls.predictions.bias`; transformers leaves the tied copies out of its files and re-ties them
on load. Reading, they may be absent or present, and when present must equal what they are
tied to (else the checkpoint is untied, which our model cannot hold: an error). Writing, we
emit only the canonical names, as transformers' own files do.

Skipped explicitly: the buffers `embeddings.position_ids` and `embeddings.token_type_ids`
(0..T-1 and zeros, not parameters) that older checkpoints contain. Old TensorFlow-converted
checkpoints name LayerNorm parameters `gamma`/`beta`; they are read as `weight`/`bias`.
Anything else that is missing, unexpected or of the wrong shape is a ValueError naming it.
"""
from __future__ import annotations

import torch

from ltk.models.bert import BertConfig

_ARCHS = {"BertForMaskedLM": (True, False), "BertModel": (False, True)}  # -> (mlm_head, pooler)
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # not parameters: skipped


def config_from_hf(d: dict) -> BertConfig:
    """transformers' BertConfig dict -> BertConfig. `architectures` picks the head (absent:
    the masked-LM head, no pooler). Features our model does not have are errors naming the field."""
    if d.get("model_type", "bert") != "bert":
        raise ValueError(f"model_type={d.get('model_type')!r} is not a BERT checkpoint")
    pos = d.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"position_embedding_type={pos!r} is not supported (only 'absolute')")
    if d.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={d.get('hidden_act')!r} is not supported (only 'gelu', the exact erf GELU)")
    for flag in ("is_decoder", "add_cross_attention"):
        if d.get(flag, False):
            raise ValueError(f"{flag}=True is not supported: this BERT is an encoder only")
    archs = d.get("architectures") or ["BertForMaskedLM"]
    if len(archs) != 1 or archs[0] not in _ARCHS:
        raise ValueError(f"architectures={archs!r} is not supported; one of {sorted(_ARCHS)}")
    mlm_head, pooler = _ARCHS[archs[0]]
    if mlm_head and not d.get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=False is not supported: our MLM decoder is the word embedding")
    hidden_drop = d.get("hidden_dropout_prob", 0.1)
    cfg = BertConfig(
        vocab_size=d["vocab_size"], block_size=d["max_position_embeddings"],
        type_vocab_size=d.get("type_vocab_size", 2), n_layer=d["num_hidden_layers"],
        n_head=d["num_attention_heads"], n_embd=d["hidden_size"], intermediate_size=d["intermediate_size"],
        dropout=hidden_drop,  # one rate for both; transformers also has attention_probs_dropout_prob
        norm_eps=d.get("layer_norm_eps", 1e-12), mlm_head=mlm_head, pooler=pooler,
    )
    cfg.validate()
    return cfg


def config_to_hf(cfg: BertConfig) -> dict:
    """BertConfig -> a transformers config.json dict (BertForMaskedLM or BertModel)."""
    cfg.validate()
    if cfg.mlm_head and cfg.pooler:
        raise ValueError("mlm_head=True with pooler=True has no transformers class without the NSP head; "
                         "export one of them (BertForMaskedLM: mlm_head only, BertModel: pooler only)")
    return {
        "architectures": ["BertForMaskedLM" if cfg.mlm_head else "BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.block_size,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    }


def _name_map(cfg: BertConfig) -> dict[str, list[str]]:
    """our name -> the HF names (without the "bert." prefix) it is made of, in order."""
    m = {
        "wte.weight": ["embeddings.word_embeddings.weight"],
        "wpe.weight": ["embeddings.position_embeddings.weight"],
        "wtt.weight": ["embeddings.token_type_embeddings.weight"],
        "ln_emb.weight": ["embeddings.LayerNorm.weight"],
        "ln_emb.bias": ["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.n_layer):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            m[ours + f"attn.qkv.{p}"] = [hf + f"attention.self.{n}.{p}" for n in ("query", "key", "value")]
            m[ours + f"attn.proj.{p}"] = [hf + f"attention.output.dense.{p}"]
            m[ours + f"ln_1.{p}"] = [hf + f"attention.output.LayerNorm.{p}"]
            m[ours + f"ffn.fc.{p}"] = [hf + f"intermediate.dense.{p}"]
            m[ours + f"ffn.proj.{p}"] = [hf + f"output.dense.{p}"]
            m[ours + f"ln_2.{p}"] = [hf + f"output.LayerNorm.{p}"]
    return m


def _head_map(cfg: BertConfig) -> dict[str, str]:
    """our name -> full HF name for the parts outside the encoder (no prefix)."""
    m = {}
    if cfg.mlm_head:
        m.update({
            "head.dense.weight": "cls.predictions.transform.dense.weight",
            "head.dense.bias": "cls.predictions.transform.dense.bias",
            "head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
            "head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
            "head.bias": "cls.predictions.bias",
        })
    if cfg.pooler:
        m.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    return m


def _shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """our name -> expected shape (from a model built on the meta device: no memory)."""
    from ltk.models.bert import Bert

    with torch.device("meta"):
        model = Bert(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _hf_prefix(cfg: BertConfig) -> str:
    return "bert." if cfg.mlm_head else ""


def _rename_legacy(name: str) -> str:
    """LayerNorm.gamma / .beta (TensorFlow-era checkpoints) -> .weight / .bias."""
    if ".LayerNorm." in name and name.endswith((".gamma", ".beta")):
        return name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
    return name


def state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """transformers tensors -> ours for Bert(cfg); strict (see the module docstring)."""
    prefix = _hf_prefix(cfg)
    src = {_rename_legacy(k): v for k, v in tensors.items()}
    for buf in _BUFFERS:  # index buffers, not parameters: nothing to load
        src.pop(prefix + buf, None)
    shapes = _shapes(cfg)
    out, missing = {}, []
    for ours, parts in _name_map(cfg).items():
        names = [prefix + p for p in parts]
        absent = [n for n in names if n not in src]
        if absent:
            missing += absent
            continue
        pieces = [src.pop(n) for n in names]
        out[ours] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)  # (3d, d) or (3d,)
    for ours, name in _head_map(cfg).items():
        if name in src:
            out[ours] = src.pop(name)
        else:
            missing.append(name)
    if cfg.mlm_head:  # tied copies: optional, but must equal what they are tied to
        for alias, ours in (("cls.predictions.decoder.weight", "wte.weight"),
                            ("cls.predictions.decoder.bias", "head.bias")):
            t = src.pop(alias, None)
            if t is not None and ours in out and not (t.shape == out[ours].shape and torch.equal(t, out[ours])):
                raise ValueError(f"{alias} differs from {_hf_name(ours, cfg)}: an untied MLM decoder is not "
                                 "supported (our decoder is the word embedding and the head bias)")
    if missing:
        raise ValueError(f"missing tensors in the BERT checkpoint: {missing}")
    if src:
        hint = ""
        if any(k.startswith("pooler.") for k in src):
            hint = " (a pooler: build with BertConfig(pooler=True))"
        elif any(k.startswith("cls.") for k in src):
            hint = " (a head this model does not have)"
        raise ValueError(f"unexpected tensors in the BERT checkpoint: {sorted(src)}{hint}")
    bad = [f"{_hf_name(k, cfg)}: {tuple(v.shape)} != {shapes[k]}"
           for k, v in out.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"shape mismatch in the BERT checkpoint (got != expected): {bad}")
    return out


def _hf_name(ours: str, cfg: BertConfig) -> str:
    """The HF name(s) one of our tensors comes from, for error messages."""
    if ours in _head_map(cfg):
        return _head_map(cfg)[ours]
    return " + ".join(_hf_prefix(cfg) + p for p in _name_map(cfg)[ours])


def state_dict_to_hf(tensors: dict[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Our tensors (Bert(cfg).state_dict()) -> transformers names; strict. The tied decoder
    copies are left out, as in transformers' own files."""
    shapes = _shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"state dict does not match BertConfig: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: {tuple(v.shape)} != {shapes[k]}" for k, v in tensors.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"shape mismatch in the state dict (got != expected): {bad}")
    prefix = _hf_prefix(cfg)
    out = {}
    for ours, parts in _name_map(cfg).items():
        t = tensors[ours]
        pieces = t.chunk(3, dim=0) if len(parts) == 3 else (t,)  # (3d, ...) -> 3 x (d, ...)
        for name, piece in zip(parts, pieces):
            out[prefix + name] = piece.contiguous()
    for ours, name in _head_map(cfg).items():
        out[name] = tensors[ours]
    return out
