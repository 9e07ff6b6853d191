"""The model zoo. Each family lives in its own file, written for one device; parallelism is
applied from outside (ltk/parallel/).

    family   config        model   objective (ltk/training/objectives.py)
    gpt      GPTConfig     GPT     causal LM        decoder-only, learned positions
    llama    LlamaConfig   Llama   causal LM        decoder-only, RoPE, GQA, SwiGLU
    bert     BertConfig    Bert    masked LM        encoder-only, bidirectional
    t5       T5Config      T5      span corruption  encoder-decoder, relative position bias
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from ltk.models import bert, gpt, llama, t5
from ltk.models.bert import Bert, BertConfig
from ltk.models.gpt import GPT, GPTConfig, flops_per_token, gpt_config, num_params
from ltk.models.llama import Llama, LlamaConfig
from ltk.models.t5 import T5, T5Config


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    num_params: Callable
    flops_per_token: Callable  # (config, seq_len) -> training FLOPs per token of text


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", GPTConfig, GPT, gpt.num_params, gpt.flops_per_token),
    "llama": Family("llama", LlamaConfig, Llama, llama.num_params, llama.flops_per_token),
    "bert": Family("bert", BertConfig, Bert, bert.num_params, bert.flops_per_token),
    "t5": Family("t5", T5Config, T5, t5.num_params, t5.flops_per_token),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), FAMILIES, n=1)
        hint = f"; did you mean {close[0]}?" if close else ";"
        raise ValueError(f"unknown model family {name!r}{hint} supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "get_family", "GPT", "GPTConfig", "Llama", "LlamaConfig", "Bert", "BertConfig",
           "T5", "T5Config", "flops_per_token", "gpt_config", "num_params"]

from ltk.models.hf.folder import from_pretrained, save_pretrained  # noqa: E402  (needs the families above)

__all__ += ["from_pretrained", "save_pretrained"]
