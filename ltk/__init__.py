"""ltk: a performance-focused kernel and systems lab for training LLMs.

Importing `ltk` imports nothing else (no torch, no transformers: `ltk --help` stays fast). The
Hugging Face drop-in loads on first use:

    ltk.patch(model)               our kernels in a transformers Llama / GPT-2 / BERT, in place
    ltk.unpatch(model)             undo it
    ltk.register_hf_attention()    make attn_implementation="ltk" known to transformers
"""
from __future__ import annotations

import importlib

# name -> module that defines it, imported on first access
_LAZY = {
    "patch": "ltk.models.hf.patch",
    "unpatch": "ltk.models.hf.patch",
    "patched": "ltk.models.hf.patch",
    "register_hf_attention": "ltk.models.hf.attn_interface",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ltk' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
