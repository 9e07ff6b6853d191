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
module's `apply_rotary_pos_emb`, which is replaced (while any patched model lives) by a dispatcher that
calls ours only inside the forward of a patched attention module and the original everywhere else.
Each patched forward is bound to its module and calls the class's forward (an instance forward set by
another library before `patch` is set aside until `unpatch`); a deep copy of a patched model is a
patched model of its own, which `unpatch` undoes.

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
_ATTENTION_CLASSES = {"llama": ("LlamaAttention",), "gpt2": ("GPT2Attention",),
                      "bert": ("BertSelfAttention", "BertCrossAttention")}
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
    """The undo log of one patch, as data: (object, attribute, was it set on the instance, old value).
    Data, not closures, so that `copy.deepcopy(model)` copies it onto the copy's own modules (every
    patched forward is a method bound to its module for the same reason)."""

    def __init__(self, backend: str, head: str | None, shift: bool):
        self.backend, self.head, self.shift = backend, head, shift
        self.attrs: list[tuple[object, str, bool, object]] = []
        self.rope_modules: list[torch.nn.Module] = []
        self.summary: dict[str, str] = {}

    def set(self, obj, name: str, value) -> None:
        self.attrs.append((obj, name, name in vars(obj), vars(obj).get(name)))
        setattr(obj, name, value)

    def bind(self, module: torch.nn.Module, forward) -> None:
        """module.forward = forward bound to module; module._ltk_backend = the backend."""
        self.set(module, "_ltk_backend", self.backend)
        self.set(module, "forward", types.MethodType(forward, module))

    def undo(self) -> None:
        for obj, name, had, old in reversed(self.attrs):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        _release_rope(self.rope_modules)


# ---------------------------------------------------------------------------------------
# norms, MLP: forwards bound to each module, reading its own parameters and _ltk_backend
# ---------------------------------------------------------------------------------------
def _rms_forward(self, x):
    from ltk.kernels.rmsnorm import rms_norm

    return rms_norm(x, self.weight, self.variance_epsilon, backend=self._ltk_backend)


def _layer_norm_forward(self, x):
    from ltk.kernels.layernorm import layer_norm

    return layer_norm(x, self.weight, self.bias, self.eps, backend=self._ltk_backend)


def _swiglu_forward(self, x):
    from ltk.kernels.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self._ltk_backend))


def _patch_norms(model, family: str, rec: _Record) -> None:
    if family == "llama":
        cls, forward, op = _modeling("llama").LlamaRMSNorm, _rms_forward, "rms_norm"
    else:
        cls, forward, op = torch.nn.LayerNorm, _layer_norm_forward, "layer_norm"
    n = 0
    for m in model.modules():
        if isinstance(m, cls) and (cls is not torch.nn.LayerNorm or
                                   (m.weight is not None and len(m.normalized_shape) == 1)):
            rec.bind(m, forward)
            n += 1
    rec.summary["norms"] = f"{n} {cls.__name__} -> ltk.kernels.{op}"


def _patch_mlp(model, family: str, rec: _Record) -> None:
    if family != "llama":
        rec.summary["mlp"] = "nothing to fuse: a plain GELU MLP"
        return
    if model.config.hidden_act not in ("silu", "swish"):
        rec.summary["mlp"] = f"left as is: hidden_act={model.config.hidden_act!r} is not SwiGLU's silu"
        return
    mlps = [m for m in model.modules() if isinstance(m, _modeling("llama").LlamaMLP)]
    for m in mlps:
        rec.bind(m, _swiglu_forward)
    rec.summary["mlp"] = f"{len(mlps)} LlamaMLP -> down_proj(ltk.kernels.swiglu(gate_proj(x), up_proj(x)))"


# ---------------------------------------------------------------------------------------
# RoPE: a dispatcher in modeling_llama, active inside patched attention modules only
# ---------------------------------------------------------------------------------------
_rope_state = {"original": None, "users": weakref.WeakSet()}  # users: patched attention modules


def _rope_dispatch(q, k, cos, sin, *args, **kwargs):
    backend = _ROPE_BACKEND.get()
    original = _rope_state["original"]
    if not _rope_state["users"]:  # every patched model is gone: give the original back
        _modeling("llama").apply_rotary_pos_emb = original
    if backend is None or args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1:
        return original(q, k, cos, sin, *args, **kwargs)
    from ltk.kernels.rope import apply_rope

    return apply_rope(q, k, cos, sin, backend=backend)  # cos, sin (B, T, D): one angle for every head


def _hold_rope(module) -> None:
    ml = _modeling("llama")
    if ml.apply_rotary_pos_emb is not _rope_dispatch:
        _rope_state["original"] = ml.apply_rotary_pos_emb
        ml.apply_rotary_pos_emb = _rope_dispatch
    _rope_state["users"].add(module)


def _release_rope(modules) -> None:
    for m in modules:
        _rope_state["users"].discard(m)
    ml = _modeling("llama") if modules else None
    if ml is not None and not _rope_state["users"] and ml.apply_rotary_pos_emb is _rope_dispatch:
        ml.apply_rotary_pos_emb = _rope_state["original"]


def _rope_attention_forward(self, *args, **kwargs):
    """LlamaAttention's own forward, with apply_rotary_pos_emb routed to ours while it runs."""
    if self not in _rope_state["users"]:  # a deep copy of a patched model: take the dispatcher too
        _hold_rope(self)
    token = _ROPE_BACKEND.set(self._ltk_backend)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _ROPE_BACKEND.reset(token)


def _patch_rope(model, family: str, rec: _Record) -> None:
    if family != "llama":
        rec.summary["rope"] = "none: learned position embeddings"
        return
    # any rope_type: cos and sin (scaled or not) still come from transformers' rotary embedding
    attns = [m for m in model.modules() if isinstance(m, _modeling("llama").LlamaAttention)]
    for m in attns:
        rec.bind(m, _rope_attention_forward)
        _hold_rope(m)
        rec.rope_modules.append(m)
    rec.summary["rope"] = f"{len(attns)} LlamaAttention: apply_rotary_pos_emb -> ltk.kernels.rope.apply_rope"


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------
def _patch_attention(model, family: str, rec: _Record) -> None:
    register_hf_attention()
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}
    for config in configs.values():  # recorded before set_attn_implementation changes them
        rec.attrs.append((config, "_attn_implementation_internal", True, config._attn_implementation_internal))
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    classes = tuple(getattr(_modeling(family), c) for c in _ATTENTION_CLASSES[family])
    n = 0
    for m in model.modules():
        if isinstance(m, classes) and "_ltk_backend" not in vars(m):  # Llama's: already set by the RoPE part
            rec.set(m, "_ltk_backend", rec.backend)
        n += isinstance(m, classes)
    rec.summary["attention"] = f"attn_implementation {before!r} -> {NAME!r} ({n} {classes[0].__name__})"


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
    rec = _Record(backend, head, shift)
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

            patch_loss(model, rec)
    except BaseException:
        rec.undo()
        raise
    model._ltk_patch = rec
    return model


def unpatch(model):
    """Undo `patch`: every forward, attribute and attention implementation back as it was; returns
    the model. Refuses a model that is not patched."""
    rec = getattr(model, "_ltk_patch", None)
    if rec is None:
        raise RuntimeError(f"this {type(model).__name__} is not patched by ltk.patch: nothing to undo")
    rec.undo()
    del model._ltk_patch
    return model


def patched(model) -> dict | None:
    """What `patch` swapped in `model`, part by part (None when it is not patched)."""
    rec = getattr(model, "_ltk_patch", None)
    return None if rec is None else {"backend": rec.backend, **rec.summary}
