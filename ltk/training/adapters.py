"""What a fine-tuning run trains: every weight, LoRA adapters, or QLoRA (an NF4 base + adapters).

Per parameter Ψ of the adapted layers, with AdamW's two fp32 moments (Hu et al. 2021; Dettmers
et al. 2023):

    none    every weight trains: weights + gradients + 2 moments = 4 copies of Ψ (fp32: 16 B/param)
    lora    W frozen; A (r x in), B (out x r) train: Ψ stays once, the trainable part is
            r·(in + out) per layer, so gradients and moments shrink by in·out / (r·(in + out))
    qlora   as lora, with W stored in NF4 (4-bit codes + block absmax, ~4.127 bits/param with
            double quantization) and dequantized tile by tile in the matmul

The engine (ltk/training/engine.py) gets the model with the adapter applied: its optimizer holds
the trainable parameters only (`param_groups` skips frozen ones), and with an adapter a
checkpoint holds those only (`checkpoint_names`): the adapters and their moments, the frozen
base referenced by path and checksums (ltk/training/base_model.py), never copied.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ltk.training.config import AdapterConfig

METHODS = ("none", "lora", "qlora")
DEFAULT_TARGETS = {"gpt": "c_attn,attn.c_proj,c_fc,mlp.c_proj", "llama": "wq,wk,wv,wo,w1,w2,w3"}
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def targets_of(cfg: AdapterConfig, family: str) -> list[str]:
    return [t.strip() for t in (cfg.targets or DEFAULT_TARGETS[family]).split(",") if t.strip()]


def apply_adapter(model: torch.nn.Module, family: str, cfg: AdapterConfig) -> torch.nn.Module:
    """The model as it trains: every parameter trainable (none), LoRA adapters, or NF4 base + LoRA."""
    if cfg.method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    kw = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.rslora)
    if cfg.method == "lora":
        from ltk.models.lora import apply_lora

        return apply_lora(model, targets_of(cfg, family), **kw)
    from ltk.models.qlora import prepare_qlora

    # the run's --trainer.activation_checkpointing decides recomputation, as for any model
    return prepare_qlora(model, targets_of(cfg, family), compute_dtype=COMPUTE_DTYPES[cfg.compute_dtype],
                         gradient_checkpointing=False, **kw)


def checkpoint_names(model: torch.nn.Module, cfg: AdapterConfig) -> set[str] | None:
    """The parameters a checkpoint holds: every one (None) without an adapter, else the trainable ones."""
    if cfg.method == "none":
        return None
    return {n for n, p in model.named_parameters() if p.requires_grad}


def write_outputs(model: torch.nn.Module, tok, out: Path, cfg: AdapterConfig, base: str, merge: bool) -> dict:
    """The fine-tuned model as users read it: adapter/ (PEFT format) for lora and qlora; model/
    (full) or, with `merge`, merged/ (the adapter folded into full-precision weights), each a
    Hugging Face folder with the tokenizer. `model` is changed (merged) in place."""
    from ltk.models.lora import lora_modules, remove_lora, save_adapter

    written = {}
    if cfg.method != "none":
        written["adapter"] = str(save_adapter(model, out / "adapter", base_model_name_or_path=base))
    if cfg.method == "none" or merge:
        folder = out / ("model" if cfg.method == "none" else "merged")
        if cfg.method == "qlora":
            from ltk.models.qlora import dequantize_model

            model = dequantize_model(model)  # NF4 -> full precision, adapters kept
        if lora_modules(model):
            model = remove_lora(model, merge=True)  # W + s·BA, plain Linear layers again
        model.save_pretrained(folder)
        tok.save(folder)
        written["model"] = str(folder)
    return written
