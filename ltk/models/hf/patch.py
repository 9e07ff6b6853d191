"""Our kernels in a transformers model, in place and undoably: `ltk.patch(model)` / `ltk.unpatch(model)`.

    import ltk, transformers
    model = transformers.LlamaForCausalLM(cfg)     # or from_pretrained(...)
    ltk.patch(model)                               # norms, attention, SwiGLU, RoPE, loss -> ltk.kernels
    loss = model(input_ids=x, labels=x).loss       # the (N, V) logits are never built in training

What is swapped, per model (transformers 5.x layouts; each part can be turned off by its flag):

    part       Llama                                  GPT-2                     BERT
    norms      LlamaRMSNorm -> rms_norm               nn.LayerNorm -> layer_norm    nn.LayerNorm -> layer_norm
    attention  attn_implementation "ltk" (ltk/models/hf/attn_interface.py), all three
    mlp        LlamaMLP: down(swiglu(gate(x), up(x)))  GELU MLP: nothing to fuse    (the same)
    rope       apply_rotary_pos_emb -> apply_rope     learned positions: none       (the same)
    loss       LlamaForCausalLM, GPT2LMHeadModel: fused_linear_cross_entropy on the last hidden states
               and lm_head.weight (labels shifted as transformers does, ignore_index, num_items_in_batch);
               BertForMaskedLM: the same on the prediction head's decoder (weight and bias, no shift)

Supported classes: LlamaForCausalLM, LlamaModel, GPT2LMHeadModel, GPT2Model, BertForMaskedLM,
BertModel; any other is refused with the list. Parameters are untouched (same tensors, same state
dict); only forward methods change, as instance attributes, so other models of the same class in the
process are unaffected. The one process-wide change is RoPE: transformers' Llama attention calls its
module's `apply_rotary_pos_emb`, which is replaced (while any model is patched) by a dispatcher that
calls ours only inside the forward of a patched attention module and the original everywhere else.

The loss: with `labels`, the patched forward runs the model as usual but captures the input of the
head instead of computing logits, then computes the loss from it with the fused kernel. In training
mode the output's `logits` is None (the point: never build them); in eval mode they are computed from
the captured states and returned beside the fused loss.

Patching twice is refused (unpatch first, or patch with other flags after unpatching): an explicit
error beats a silent second layer of wrappers. `unpatch` restores every attribute it set (and the
attention implementation each config had), so outputs are bit-identical to before `patch`.
"""
from __future__ import annotations

import contextvars
import types
import weakref

import torch

from ltk.models.hf.attn_interface import NAME, register_hf_attention

# class name -> (family, dotted path of the output head or None, labels shifted?)
SUPPORTED = {
    "LlamaForCausalLM": ("llama", "lm_head", True),
    "LlamaModel": ("llama", None, False),
    "GPT2LMHeadModel": ("gpt2", "lm_head", True),
    "GPT2Model": ("gpt2", None, False),
    "BertForMaskedLM": ("bert", "cls.predictions.decoder", False),
    "BertModel": ("bert", None, False),
}
_ATTENTION_CLASSES = {"llama": ("llama", "LlamaAttention"), "gpt2": ("gpt2", "GPT2Attention"),
                      "bert": ("bert", "BertSelfAttention")}
_ROPE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("ltk_rope_backend", default=None)


def _modeling(family: str):
    import importlib

    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def _identify(model) -> tuple[str, str | None, bool]:
    import transformers

    for name, spec in SUPPORTED.items():
        if isinstance(model, getattr(transformers, name)):
            return spec
    raise TypeError(f"ltk.patch supports {', '.join(SUPPORTED)}; got {type(model).__name__}. Other models can "
                    f"still use our attention: ltk.register_hf_attention(), then attn_implementation={NAME!r}")


class _Record:
    """The undo log of one patch: each attribute set, with what it replaced."""

    def __init__(self, backend: str):
        self.backend, self.undo, self.summary = backend, [], {}

    def set(self, obj, name: str, value) -> None:
        had, old = name in vars(obj), vars(obj).get(name)
        setattr(obj, name, value)
        self.undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))


# ---------------------------------------------------------------------------------------
# norms, MLP
# ---------------------------------------------------------------------------------------
def _rms_forward(backend):
    from ltk.kernels.rmsnorm import rms_norm

    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon, backend=backend)
    return forward


def _layer_norm_forward(backend):
    from ltk.kernels.layernorm import layer_norm

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, backend=backend)
    return forward


def _swiglu_forward(backend):
    from ltk.kernels.swiglu import swiglu

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))
    return forward


def _patch_norms(model, family: str, rec: _Record) -> None:
    if family == "llama":
        cls, make = _modeling("llama").LlamaRMSNorm, _rms_forward
    else:
        cls, make = torch.nn.LayerNorm, _layer_norm_forward
    forward, n = make(rec.backend), 0
    for m in model.modules():
        if isinstance(m, cls) and (cls is not torch.nn.LayerNorm or
                                   (m.weight is not None and len(m.normalized_shape) == 1)):
            rec.set(m, "forward", types.MethodType(forward, m))
            n += 1
    rec.summary["norms"] = f"{n} {cls.__name__} -> ltk.kernels.{'rms_norm' if family == 'llama' else 'layer_norm'}"


def _patch_mlp(model, family: str, rec: _Record) -> None:
    if family != "llama":
        rec.summary["mlp"] = "nothing to fuse: a plain GELU MLP"
        return
    if model.config.hidden_act not in ("silu", "swish"):
        rec.summary["mlp"] = f"left as is: hidden_act={model.config.hidden_act!r} is not SwiGLU's silu"
        return
    forward, n = _swiglu_forward(rec.backend), 0
    for m in model.modules():
        if isinstance(m, _modeling("llama").LlamaMLP):
            rec.set(m, "forward", types.MethodType(forward, m))
            n += 1
    rec.summary["mlp"] = f"{n} LlamaMLP -> down_proj(ltk.kernels.swiglu(gate_proj(x), up_proj(x)))"


# ---------------------------------------------------------------------------------------
# RoPE: a dispatcher in modeling_llama, active inside patched attention modules only
# ---------------------------------------------------------------------------------------
_rope_state = {"users": 0, "original": None}


def _rope_dispatch(q, k, cos, sin, *args, **kwargs):
    backend = _ROPE_BACKEND.get()
    if backend is None or args or kwargs.get("unsqueeze_dim", 1) != 1 or set(kwargs) - {"unsqueeze_dim"}:
        return _rope_state["original"](q, k, cos, sin, *args, **kwargs)
    from ltk.kernels.rope import apply_rope

    return apply_rope(q, k, cos, sin, backend=backend)  # cos, sin (B, T, D): one angle per head


def _uninstall_rope(ml) -> None:
    _rope_state["users"] -= 1
    if _rope_state["users"] == 0 and ml.apply_rotary_pos_emb is _rope_dispatch:
        ml.apply_rotary_pos_emb = _rope_state["original"]


def _install_rope(model, rec: _Record) -> None:
    """The dispatcher stays while a patched model uses it: until its unpatch, or its collection."""
    ml = _modeling("llama")
    if _rope_state["users"] == 0:
        _rope_state["original"] = ml.apply_rotary_pos_emb
        ml.apply_rotary_pos_emb = _rope_dispatch
    _rope_state["users"] += 1
    rec.undo.append(weakref.finalize(model, _uninstall_rope, ml))  # runs once: at unpatch or collection


def _with_rope(forward, backend):
    def wrapped(*args, **kwargs):
        token = _ROPE_BACKEND.set(backend)
        try:
            return forward(*args, **kwargs)
        finally:
            _ROPE_BACKEND.reset(token)
    return wrapped


def _patch_rope(model, family: str, rec: _Record) -> None:
    if family != "llama":
        rec.summary["rope"] = "none: learned position embeddings"
        return
    _install_rope(model, rec)  # any rope_type: cos and sin (scaled or not) still come from transformers
    n = 0
    for m in model.modules():
        if isinstance(m, _modeling("llama").LlamaAttention):
            rec.set(m, "forward", _with_rope(m.forward, rec.backend))
            n += 1
    rec.summary["rope"] = f"{n} LlamaAttention: apply_rotary_pos_emb -> ltk.kernels.rope.apply_rope"


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------
def _patch_attention(model, family: str, rec: _Record) -> None:
    register_hf_attention()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and
               hasattr(m.config, "_attn_implementation_internal")}
    for config in configs.values():
        old = config._attn_implementation_internal
        rec.undo.append(lambda c=config, old=old: setattr(c, "_attn_implementation_internal", old))
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    module, cls = _ATTENTION_CLASSES[family]
    n = 0
    for m in model.modules():
        if isinstance(m, getattr(_modeling(module), cls)):
            rec.set(m, "_ltk_backend", rec.backend)
            n += 1
    rec.summary["attention"] = f"attn_implementation {before!r} -> {NAME!r} ({n} {cls})"


def patch(model, *, norms: bool = True, attention: bool = True, mlp: bool = True, rope: bool = True,
          loss: bool = True, backend: str = "auto"):
    """Swap the model's norms, attention, MLP activation, RoPE and loss for ltk's kernels, in place;
    returns the model. `backend` ("auto", "torch", "triton") goes to every kernel call. Refuses an
    unsupported class and a model that is already patched. What was swapped: `patched(model)`."""
    from ltk.kernels.backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    family, head, shift = _identify(model)
    if getattr(model, "_ltk_patch", None) is not None:
        raise RuntimeError(f"this {type(model).__name__} is already patched by ltk.patch "
                           f"({patched(model)}); call ltk.unpatch(model) first")
    rec = _Record(backend)
    try:
        if norms:
            _patch_norms(model, family, rec)
        if mlp:
            _patch_mlp(model, family, rec)
        if rope:
            _patch_rope(model, family, rec)
        if attention:
            _patch_attention(model, family, rec)
        if loss:
            from ltk.models.hf.patch_loss import patch_loss

            patch_loss(model, head, shift, rec)
    except BaseException:
        _undo(rec)
        raise
    model._ltk_patch = rec
    return model


def _undo(rec: _Record) -> None:
    for undo in reversed(rec.undo):
        undo()


def unpatch(model):
    """Undo `patch`: every forward, attribute and attention implementation back as it was; returns
    the model. Refuses a model that is not patched."""
    rec = getattr(model, "_ltk_patch", None)
    if rec is None:
        raise RuntimeError(f"this {type(model).__name__} is not patched by ltk.patch: nothing to undo")
    _undo(rec)
    del model._ltk_patch
    return model


def patched(model) -> dict | None:
    """What `patch` swapped in `model`, part by part (None when it is not patched)."""
    rec = getattr(model, "_ltk_patch", None)
    return None if rec is None else {"backend": rec.backend, **rec.summary}
