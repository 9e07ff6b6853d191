"""The loss part of `ltk.patch` (ltk/models/hf/patch.py): a transformers LM's loss computed by
ltk.kernels.fused_linear_ce from the last hidden states and the head's weight, without the logits.

transformers' causal-LM loss (transformers/loss/loss_utils.py, `ForCausalLMLoss`) is

    logits = h Wᵀ (B, T, V), upcast to fp32
    y'     = labels shifted left by one, the last position ignore_index   (unless shift_labels is given)
    loss   = CE(logits, y') summed over the non-ignored positions / (#non-ignored, or num_items_in_batch)

(num_items_in_batch: the Trainer's count over all gradient-accumulation micro-batches, so that the
sum of their losses is the mean over the whole batch). BertForMaskedLM's is the plain mean CE over
positions whose label is not −100, with the decoder's bias. We compute the same numbers with
`fused_linear_cross_entropy(h, W, y', b)`, which never holds the (B·T, V) logits (3.3 GB in fp32 for
8k tokens of GPT-2's vocabulary, 4.2 GB at Llama-3's 128,256).

How, without copying transformers' forward: the head (an nn.Linear) gets a forward that, while a
patched forward with labels is running, records its input and returns an empty (B, T, 0) tensor;
the original forward runs with labels=None (so computes no loss), and the loss is computed after.
"""
from __future__ import annotations

import contextvars
import inspect

import torch.nn.functional as F

_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("ltk_head_capture", default=None)


class _Slot:
    def __init__(self, head):
        self.head, self.h = head, None


def _head_forward(self, x):
    """The head's forward: records its input instead while a patched forward with labels runs."""
    slot = _CAPTURE.get()
    if slot is not None and slot.head is self:
        slot.h = x  # (B, T, d): what the logits would be computed from
        return x.new_empty((*x.shape[:-1], 0))
    return type(self).forward(self, x)


def _take_labels(names: list[str], args: tuple, kwargs: dict):
    """Remove `labels` from the call, given positionally or by name: (labels, args, kwargs)."""
    if "labels" in kwargs:
        return kwargs.pop("labels"), args, kwargs
    i = names.index("labels")
    if i < len(args):
        return args[i], args[:i] + (None,) + args[i + 1:], kwargs
    return None, args, kwargs


def lm_loss(h, labels, head, shift: bool, kwargs: dict, backend: str):
    """transformers' LM loss of hidden states h (B, T, d) through `head`, by the fused kernel."""
    from ltk.kernels.fused_linear_ce import fused_linear_cross_entropy

    ignore = kwargs.get("ignore_index", -100) if shift else -100
    target = kwargs.get("shift_labels") if shift else labels
    if target is None:  # tokens < n predict n; the last position has no next token
        target = F.pad(labels, (0, 1), value=ignore)[..., 1:]  # (B, T)
    n_items = kwargs.get("num_items_in_batch") if shift else None
    h2, t = h.reshape(-1, h.shape[-1]), target.reshape(-1).to(h.device)  # (B·T, d), (B·T,)
    loss = fused_linear_cross_entropy(h2, head.weight, t, head.bias, ignore_index=ignore,
                                      reduction="mean" if n_items is None else "sum", backend=backend)
    return loss if n_items is None else loss / (n_items.to(loss.device) if hasattr(n_items, "to") else n_items)


def _lm_forward(self, *args, **kwargs):
    """The model's forward: transformers' own, with the loss taken over when labels are given."""
    rec, original = self._ltk_patch_loss, type(self).forward
    labels, args, kwargs = _take_labels(rec["names"], args, kwargs)
    if labels is None:
        return original(self, *args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    head = self.get_submodule(rec["head"])
    slot = _Slot(head)
    token = _CAPTURE.set(slot)
    try:
        out = original(self, *args, return_dict=True, **kwargs)
    finally:
        _CAPTURE.reset(token)
    if slot.h is None:
        raise RuntimeError(f"{type(self).__name__}'s forward did not call its head {rec['head']}: the fused loss "
                           "needs its input (patch with loss=False)")
    loss = lm_loss(slot.h, labels, head, rec["shift"], kwargs, rec["backend"])
    logits = None if self.training else type(head).forward(head, slot.h)  # eval: callers read them
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    out = type(out)(loss=loss, logits=logits, **fields)
    return out if return_dict else out.to_tuple()


def patch_loss(model, rec) -> None:
    """Route `model`'s loss with labels through the fused kernel (see the module docstring)."""
    if rec.head is None:
        rec.summary["loss"] = f"none: {type(model).__name__} has no head and takes no labels"
        return
    import types

    head = model.get_submodule(rec.head)
    names = [p for p in inspect.signature(type(model).forward).parameters if p != "self"]
    rec.set(head, "forward", types.MethodType(_head_forward, head))
    rec.set(model, "_ltk_patch_loss", {"head": rec.head, "shift": rec.shift, "backend": rec.backend, "names": names})
    rec.set(model, "forward", types.MethodType(_lm_forward, model))
    rec.summary["loss"] = (f"{type(model).__name__}(labels=...) -> ltk.kernels.fused_linear_cross_entropy on "
                           f"{rec.head}'s input; logits None in training mode")
