"""`ltk finetune`: fine-tuning a pretrained causal LM on instruction data — full, LoRA or QLoRA —
as flags mapped onto the training loop (ltk/training/trainer.py, the same loop as `ltk train`).

    ltk finetune --method lora --base runs/pretrain/.../train --data builtin --steps 300
    ltk finetune --method qlora --base path/to/hf-llama-folder --data alpaca.jsonl --merge
    ltk finetune --method lora ... --out runs/ft --resume runs/ft      # continue exactly where it stopped
    ltk finetune --method lora --base hf/llama --data big.jsonl --stream --chat-template base

What each method trains and stores: ltk/training/adapters.py. The data (prompts rendered with a
template, the loss on the response only; --packing several examples to a row; --stream reads a
large .jsonl row by row; --chat-template renders rows with a tokenizer's chat_template, the loss on
the assistant turns) and the evaluation (response loss and perplexity; exact match on the built-in
task): ltk/training/instruct_run.py.
From the Trainer come checkpoints with exact resume (adapters and their optimizer state only, the
base referenced), gradient accumulation, bf16, warmup + cosine, clipping and --profile.

Output folder: metrics.jsonl, loss.png, summary.json, checkpoints/, adapter/ (PEFT format, lora and
qlora); model/ (full) or, with --merge, merged/ — a Hugging Face folder of the full weights (the
adapter folded in).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ltk.training.config import AdapterConfig, OptimConfig, ParallelConfig, RunConfig, TaskConfig, TrainerConfig

METHODS = ("full", "lora", "qlora")


@dataclass
class FinetuneConfig:
    method: str = "lora"  # full | lora | qlora
    base: str = ""  # one of our run folders / checkpoints, or a Hugging Face folder
    data: str = "builtin"  # builtin | builtin:KIND,... | a .jsonl file (Alpaca or chat rows)
    out_dir: str = "runs/finetune"
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1  # batches of batch_size examples per optimizer step
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
    dtype: str = "fp32"  # the Trainer's: fp32 | bf16 (bf16 weights, fp32 master) | auto
    val_fraction: float = 0.1
    eval_examples: int = 64
    eval_every: int = 100  # 0 = evaluate only after the last step
    ckpt_every: int = 0  # 0 = a checkpoint after the last step only
    limit: int | None = None  # use at most this many examples
    seed: int = 0
    device: str = "auto"
    profile: bool = False  # torch.profiler over a few steps -> profile/ (ltk/training/profiling.py)
    merge: bool = False  # also write merged/ (full weights with the adapter folded in)
    stream: bool = False  # read the .jsonl row by row through a shuffle buffer (ltk/training/instruct_stream.py)
    stream_buffer: int = 1024  # rows in the shuffle buffer
    val_rows: int = 1000  # with stream or chat_template: at most this many val rows
    chat_template: str | None = None  # None | base (the base folder's) | a HF folder / .jinja (chat_template.py)
    parallel: str = "auto"  # the data-parallel engine over the ranks: ddp | zero3 | fsdp2 | ... (config_check)
    extra: dict = field(default_factory=dict)


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse settings that cannot run, naming the flag and its allowed range, before the base
    loads or the output folder is made (a bad value should cost a second, not a model load)."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    if not cfg.base:
        raise ValueError("--base is required: one of our run folders / checkpoints, or a Hugging Face folder")
    lowest = [("--steps", cfg.steps, 1, ""), ("--batch-size", cfg.batch_size, 1, ""), ("--lora-r", cfg.lora_r, 1, ""),
              ("--grad-accum", cfg.grad_accum, 1, ""),
              ("--max-len", cfg.max_len, 2, " (a prompt token and the token it predicts)"),
              ("--eval-every", cfg.eval_every, 0, " (0 = only after the last step)"),
              ("--limit", cfg.limit, 2, " (an example to train on and one to validate with)")]
    for flag, value, low, why in lowest:
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}{why}")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise ValueError(f"--lr {cfg.lr}: must be a finite number >= 0 (0 = the method's default)")
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise ValueError(f"--lora-alpha {cfg.lora_alpha}: must be a finite number > 0")
    if not 0.0 <= cfg.lora_dropout < 1.0:  # p = 1 would drop every input of the adapter
        raise ValueError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")


def run_config(cfg: FinetuneConfig) -> RunConfig:
    """The Trainer's config of a fine-tuning run. AdamW as before the loops were one: β2 0.999, no
    weight decay unless asked, warmup then cosine to 0.1·lr; a row in metrics.jsonl every step."""
    lr = cfg.lr or (3e-4 if cfg.method == "full" else 3e-3)
    return RunConfig(
        name=f"finetune-{cfg.method}",
        task=TaskConfig(kind="instruct", base=str(cfg.base), data=cfg.data, max_len=cfg.max_len, packing=cfg.packing,
                        val_fraction=cfg.val_fraction, eval_examples=cfg.eval_examples, limit=cfg.limit,
                        stream=cfg.stream, stream_buffer=cfg.stream_buffer, val_rows=cfg.val_rows,
                        chat_template=cfg.chat_template),
        adapter=AdapterConfig(method="none" if cfg.method == "full" else cfg.method, r=cfg.lora_r,
                              alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, rslora=cfg.use_rslora,
                              targets=cfg.targets, compute_dtype=cfg.compute_dtype),
        optim=OptimConfig(lr=lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, beta2=0.999,
                          grad_clip=cfg.grad_clip),
        trainer=TrainerConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                              seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, eval_every=cfg.eval_every,
                              log_every=1, ckpt_every=cfg.ckpt_every, out_dir=cfg.out_dir, profile=cfg.profile),
        parallel=ParallelConfig(strategy=cfg.parallel),
    )


def run_finetune(cfg: FinetuneConfig, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train (or, `resume`: a checkpoint or run folder, or "auto", continue), then write the adapter
    and merged / full model folders; returns the summary (also in summary.json)."""
    from ltk.training.base_model import adopt_base
    from ltk.training.checkpoint import load_checkpoint
    from ltk.training.resume import auto_resume, check_resume
    from ltk.training.trainer import Trainer
    from ltk.training.writable import writable_dir

    check_config(cfg)
    out = writable_dir(cfg.out_dir, "--out")
    run = run_config(cfg)
    adopt_base(run)  # the base's architecture, which a checkpoint's must be
    ckpt = None
    if resume == "auto":
        path, _ = auto_resume(run)
        ckpt = load_checkpoint(path) if path is not None else None
    elif resume:
        ckpt = load_checkpoint(resume)
        check_resume(run, ckpt.state, ckpt.path)
    trainer = Trainer(run, ckpt, overwrite=overwrite, auto=resume == "auto")
    result = trainer.fit()
    from ltk.training.adapters import write_outputs
    from ltk.training.finetune_outputs import output_model

    if trainer.rt.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's part of the last checkpoint is on disk
    model = output_model(trainer, result.checkpoint, cfg.merge)  # rank 0's; None elsewhere
    if model is None:
        return {}
    summary = json.loads((out / "summary.json").read_text())
    summary.update(write_outputs(model, trainer.task.tok, out, run.adapter, str(cfg.base), cfg.merge))
    summary.update(method=cfg.method, config=asdict(cfg))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
