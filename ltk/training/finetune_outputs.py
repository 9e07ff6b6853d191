"""The model a fine-tuning run writes its outputs from (adapter/ in PEFT format, merged/ or model/:
ltk/training/adapters.py `write_outputs`), on rank 0 only.

    one process, ddp, naive-ddp, torch-ddp   the trained model itself (every rank holds it whole)
    zero3, fsdp2                             no rank holds it whole: rank 0 rebuilds it from the
                                             run's last checkpoint, which every rank has just
                                             written (sharded; with an adapter it holds the
                                             adapters only, ltk/training/adapters.py)

Rebuilding, sharded engines:

    adapter/ only    the model's skeleton on the meta device (no weights), plain LoRA layers on it
                     (QLoRA's A and B have the same names and shapes), the adapters' tensors
                     assigned: the adapters' bytes, not the base's
    merged/, model/  the base read whole on the CPU (QLoRA: quantized as training quantized it,
                     the same NF4 codes), the checkpoint's tensors loaded into it: rank 0 holds
                     one whole copy of the base at the end, as a single-process run always does
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ltk.training.adapters import apply_adapter


def output_model(trainer, checkpoint: Path | None, merge: bool) -> torch.nn.Module | None:
    """The model whose weights the outputs are written from (module docstring); None on ranks
    other than 0. A collective-free call; the caller has made sure every rank finished saving."""
    if not trainer.rt.is_main:
        return None
    if trainer.rt.world_size == 1 or trainer.par._whole_locally():
        return trainer.model
    if checkpoint is None:
        raise RuntimeError("a sharded fine-tuning run writes its outputs from its last checkpoint, and none was saved")
    from ltk.models import get_family
    from ltk.models.init import build_on_meta
    from ltk.training.checkpoint import full_model_state, restore_model

    cfg = trainer.cfg
    saved = full_model_state(checkpoint)  # the adapters (or, full fine-tuning, every weight)
    family = get_family(cfg.family)
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn and overwritten: leave the RNG as it was
        if cfg.adapter.method != "none" and not merge:
            model = build_on_meta(lambda: family.model_cls(cfg.model))
            model = apply_adapter(model, cfg.family, dataclasses.replace(cfg.adapter, method="lora"))
            missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in saved)
            if missing:
                raise KeyError(f"{checkpoint} lacks the adapters {missing[:4]}")
            model.load_state_dict(saved, strict=False, assign=True)
            return model
        model = family.model_cls(cfg.model)
        if cfg.adapter.method == "none":
            restore_model(model, saved)
            return model
        restore_model(model, trainer.base.tensors())
        model = apply_adapter(model, cfg.family, cfg.adapter)
        result = model.load_state_dict(saved, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"{checkpoint} holds tensors the adapted model lacks: {result.unexpected_keys[:4]}")
        return model
