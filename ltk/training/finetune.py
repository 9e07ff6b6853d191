"""Fine-tuning a pretrained causal LM on instruction data: full, LoRA or QLoRA.

    ltk finetune --method lora --base runs/pretrain/.../train --data builtin --steps 300
    ltk finetune --method qlora --base path/to/hf-llama-folder --data alpaca.jsonl --merge

The three methods differ in what is trained and what is stored (Hu et al. 2021; Dettmers et
al. 2023), per parameter Ψ of the adapted layers, with AdamW's two fp32 moments:

    full    every weight trains: weights + gradients + 2 moments = 4 copies of Ψ (fp32: 16 B/param)
    lora    W frozen; A (r x in), B (out x r) train: Ψ stays once, the trainable part is
            r·(in + out) per layer, so gradients and moments shrink by in·out / (r·(in + out))
    qlora   as lora, with W stored in NF4 (4-bit codes + block absmax, ~4.127 bits/param with
            double quantization) and dequantized tile by tile in the matmul

Data (ltk/training/instruct.py): prompts rendered with a template, the loss only on the response
and its end-of-text token (prompt labels are -100); with --packing each step's examples are
packed several to a row (ltk/training/packing.py): the same examples and loss in fewer slots.
--stream reads a large .jsonl row by row (ltk/training/instruct_stream.py); --chat-template renders
rows with a tokenizer's chat_template, the loss on every assistant turn (ltk/training/chat_template.py).
Evaluation: exact-match accuracy of greedy answers on the built-in task, validation loss and
perplexity on any data (padded batches either way). Output folder:
metrics.jsonl, loss.png, summary.json, adapter/ (PEFT format, lora and qlora); model/ (full) or, with
--merge, merged/ — a Hugging Face folder of the full weights (the adapter folded in).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ltk.training.run_plot import plot_at_end, plot_run

METHODS = ("full", "lora", "qlora")
DEFAULT_TARGETS = {"gpt": "c_attn,attn.c_proj,c_fc,mlp.c_proj", "llama": "wq,wk,wv,wo,w1,w2,w3"}


@dataclass
class FinetuneConfig:
    method: str = "lora"  # full | lora | qlora
    base: str = ""  # one of our run folders / checkpoints, or a Hugging Face folder
    data: str = "builtin"  # builtin | builtin:KIND,... | a .jsonl file (Alpaca or chat rows)
    out_dir: str = "runs/finetune"
    steps: int = 300
    batch_size: int = 16
    max_len: int = 128  # tokens per example (prompt + response + end-of-text); per row when packing
    packing: bool = False  # pack each step's examples into rows of max_len (training only)
    lr: float = 0.0  # 0 = the method's default: 3e-4 full, 3e-3 lora/qlora
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    targets: str = ""  # comma list of name patterns; "" = every projection of the blocks
    compute_dtype: str = "fp32"  # fp32 | bf16: what the matmuls of a QLoRA model run in
    val_fraction: float = 0.1
    eval_examples: int = 64
    eval_every: int = 100  # 0 = evaluate only after the last step
    limit: int | None = None  # use at most this many examples
    seed: int = 0
    device: str = "auto"
    merge: bool = False  # also write merged/ (full weights with the adapter folded in)
    stream: bool = False  # read the .jsonl row by row through a shuffle buffer (ltk/training/instruct_stream.py)
    chat_template: str = ""  # "" | auto (the base folder's) | a HF folder / .jinja: its chat_template renders rows
    extra: dict = field(default_factory=dict)


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse settings that cannot run, naming the flag and its allowed range, before the base
    loads or the output folder is made (a bad value should cost a second, not a model load)."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    if not cfg.base:
        raise ValueError("--base is required: one of our run folders / checkpoints, or a Hugging Face folder")
    lowest = [("--steps", cfg.steps, 1, ""), ("--batch-size", cfg.batch_size, 1, ""), ("--lora-r", cfg.lora_r, 1, ""),
              ("--max-len", cfg.max_len, 2, " (a prompt token and the token it predicts)"),
              ("--eval-every", cfg.eval_every, 0, " (0 = only after the last step)"),
              ("--limit", cfg.limit, 2, " (an example to train on and one to validate with)")]
    for flag, value, low, why in lowest:
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}{why}")
    if (cfg.stream or cfg.chat_template) and not cfg.data.endswith(".jsonl"):
        raise ValueError(f"--stream and --chat-template read a .jsonl file, not --data {cfg.data}")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise ValueError(f"--lr {cfg.lr}: must be a finite number >= 0 (0 = the method's default)")
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise ValueError(f"--lora-alpha {cfg.lora_alpha}: must be a finite number > 0")
    if not 0.0 <= cfg.lora_dropout < 1.0:  # p = 1 would drop every input of the adapter
        raise ValueError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")


def load_base(path: str | Path, device: torch.device):
    """(model, tokenizer, family) from one of our run folders / checkpoints or an HF folder."""
    from ltk.models import Llama, from_pretrained, get_family
    from ltk.models.hf.folder import is_hf_folder
    from ltk.training.checkpoint import load_checkpoint, restore_model
    from ltk.training.config_check import check_weights
    from ltk.training.config_file import config_from_dict
    from ltk.training.tokenizer import Tokenizer

    path = Path(path)
    if is_hf_folder(path):
        model = from_pretrained(path)
        family = ("llama" if isinstance(model, Llama)
                  else "gpt" if isinstance(model, get_family("gpt").model_cls) else None)
        tok_dir = path
    else:
        ckpt = load_checkpoint(path)
        cfg = config_from_dict(ckpt.state["config"], ckpt.path / "state.json")
        check_weights(cfg, ckpt.path / "state.json")  # absurd sizes refused before the model is built
        family = cfg.family
        model = get_family(family).model_cls(cfg.model)
        restore_model(model, ckpt.model)
        tok_dir = ckpt.path
    if family not in DEFAULT_TARGETS:
        raise ValueError(f"{path}: fine-tuning takes a causal LM (gpt or llama), not {type(model).__name__}")
    if not (tok_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{tok_dir} has no tokenizer.json: the base needs its tokenizer")
    return model.to(device), Tokenizer.load(tok_dir), family


def prepare_model(model, family: str, cfg: FinetuneConfig):
    """Apply the method: nothing (full), LoRA adapters, or NF4 base + LoRA adapters."""
    targets = [t.strip() for t in (cfg.targets or DEFAULT_TARGETS[family]).split(",") if t.strip()]
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "lora":
        from ltk.models.lora import apply_lora

        return apply_lora(model, targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          use_rslora=cfg.use_rslora)
    from ltk.models.qlora import prepare_qlora

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.compute_dtype]
    return prepare_qlora(model, targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         use_rslora=cfg.use_rslora, compute_dtype=dtype, gradient_checkpointing=False)


class saved_activations:
    """Bytes of the tensors autograd saves for backward during a forward (each storage once):
    the activation memory of a training step, measured on any device."""

    def __init__(self, model: torch.nn.Module):
        # weights saved for backward (dX = dY·W) are model state, not activations
        self._state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def __enter__(self):
        self.bytes, self._seen = 0, set(self._state)

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in self._seen:
                self._seen.add(st.data_ptr())
                self.bytes += st.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def causal_loss(model, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not -100 (the responses);
    segments: the (B, T) example ids of packed rows (ltk/training/packing.py)."""
    logits = model(x) if segments is None else model(x, segments=segments)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, tok, val, cfg: FinetuneConfig, device, builtin: bool) -> dict[str, float]:
    from ltk.training.instruct import batches, exact_match

    was = model.training
    model.eval()
    out: dict[str, float] = {}
    nats, n = 0.0, 0
    for x, y in batches(val, tok, cfg.batch_size, cfg.max_len, shuffle=False, epochs=1):
        x, y = x.to(device), y.to(device)
        k = int((y != -100).sum())
        nats += causal_loss(model, x, y).item() * k
        n += k
    out["val_loss"] = nats / max(n, 1)
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    if builtin:
        scores = exact_match(model, tok, val[:cfg.eval_examples], device=device, by_kind=True)
        out["exact_match"] = scores.pop("all")
        out.update({f"exact_match/{kind}": v for kind, v in scores.items()})
    model.train(was)
    return out


def rows_data(cfg: FinetuneConfig, tok):
    """--stream / --chat-template: (training batches, training rows or None, encoded val rows)."""
    from ltk.training.chat_template import load_chat_template
    from ltk.training.instruct_stream import instruction_data

    template = None
    if cfg.chat_template:
        template = load_chat_template(cfg.base if cfg.chat_template == "auto" else cfg.chat_template)
    return instruction_data(cfg.data, tok, max_len=cfg.max_len, batch_size=cfg.batch_size,
                            val_fraction=cfg.val_fraction, seed=cfg.seed, stream=cfg.stream, template=template,
                            packing=cfg.packing, limit=cfg.limit)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    from ltk.models.lora import lora_modules, remove_lora, save_adapter
    from ltk.training.config import OptimConfig
    from ltk.training.instruct import batches, load_examples, split
    from ltk.training.optim import lr_at, set_lr
    from ltk.training.packing import real_tokens
    from ltk.training.runtime import resolve_device, seed_everything
    from ltk.training.writable import writable_dir

    check_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out = writable_dir(cfg.out_dir, "--out")
    model, tok, family = load_base(cfg.base, device)
    if cfg.max_len > model.config.block_size:
        raise ValueError(f"--max-len {cfg.max_len} is longer than the base model's {model.config.block_size} positions")
    builtin = cfg.data == "builtin" or cfg.data.startswith("builtin:")
    if cfg.stream or cfg.chat_template:  # rows encoded by the stream's functions (ltk/training/instruct_stream.py)
        stream, n_train, val = rows_data(cfg, tok)
    else:
        examples = load_examples(cfg.data, limit=cfg.limit)
        train, val = split(examples, cfg.val_fraction, cfg.seed)
        n_train = len(train)
    before = evaluate(model, tok, val, cfg, device, builtin)
    total_params = sum(p.numel() for p in model.parameters())
    model = prepare_model(model, family, cfg).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or (3e-4 if cfg.method == "full" else 3e-3)
    optim_cfg = OptimConfig(lr=lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                            grad_clip=cfg.grad_clip)
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    model.train()
    if not (cfg.stream or cfg.chat_template):
        stream = batches(train, tok, cfg.batch_size, cfg.max_len, shuffle=True, seed=cfg.seed, packing=cfg.packing)
    log = out / "metrics.jsonl"
    log.write_text("")
    t0, step_times, last = time.perf_counter(), [], {}
    tokens, slots = 0, 0  # real tokens and row slots of the training batches
    for step in range(1, cfg.steps + 1):
        x, y, *rest = next(stream)  # packed batches carry a third tensor, the (B, T) segment ids
        segments = rest[0] if cfg.packing else None
        tokens, slots = tokens + real_tokens(y, segments), slots + x.numel()
        x, y = x.to(device), y.to(device)
        segments = None if segments is None else segments.to(device)
        t = time.perf_counter()
        set_lr(opt, lr_at(step - 1, optim_cfg, cfg.steps))
        last_step = step == cfg.steps
        with saved_activations(model) if last_step else contextlib.nullcontext() as acts:
            loss = causal_loss(model, x, y, segments)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        if last_step:  # gradients and Adam's moments all exist now
            from ltk.models.qlora import memory_breakdown

            memory = {**memory_breakdown(model, opt), "activations": acts.bytes}
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
        last = {"step": step, "loss": loss.item(), "grad_norm": norm.item(), "lr": opt.param_groups[0]["lr"]}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            last.update(evaluate(model, tok, val, cfg, device, builtin))
        with log.open("a") as f:
            f.write(json.dumps(last) + "\n")
    if plot_at_end():
        plot_run(out)  # loss.png: training and validation loss, learning rate
    after = {k: v for k, v in last.items() if k.startswith(("val", "exact_match"))}
    summary = {"method": cfg.method, "family": family, "base": str(cfg.base), "data": cfg.data,
               "params": total_params, "trainable_params": sum(p.numel() for p in trainable),
               "train_examples": n_train, "val_examples": len(val), "before": before, "after": after,
               "step_ms_median": 1e3 * sorted(step_times)[len(step_times) // 2], "seconds": time.perf_counter() - t0,
               "memory": memory, "batch_tokens": int(x.numel()),
               "packing": cfg.packing, "packing_efficiency": tokens / slots, "config": asdict(cfg)}
    if cfg.method != "full":
        summary["adapter"] = str(save_adapter(model, out / "adapter", base_model_name_or_path=str(cfg.base)))
    if cfg.method == "full" or cfg.merge:  # a Hugging Face folder with the full weights
        folder = out / ("model" if cfg.method == "full" else "merged")
        merged = model
        if cfg.method == "qlora":
            from ltk.models.qlora import dequantize_model

            merged = dequantize_model(merged)  # NF4 -> full precision, adapters kept
        if lora_modules(merged):
            merged = remove_lora(merged, merge=True)  # W + s·BA, plain Linear layers again
        merged.save_pretrained(folder)
        tok.save(folder)
        summary["model"] = str(folder)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
