"""The checks a run config passes before anything is allocated.

`check_run` is called once by the Trainer, before it joins a process group, prepares data or
builds a model (and by `ltk train` before it starts processes), so a bad value is one line
naming the flag and its allowed range, not a traceback minutes later or a run that trains on
garbage (an infinite learning rate gives NaN loss at step 1; a zero batch trains nothing). A
value that still makes a meaningful run only warns.

    fields      every number in its range, every name one of its choices
    model       the family's own validate() (n_head divides n_embd, ...)
    engines     what each engine of ltk/parallel/ runs with (ltk/training/config_check_engines.py)
    cp          context parallelism: what it runs with (ltk/training/config_check_cp.py)
    layout      the parallel layout fits the world: a strategy other than auto needs several
                processes; world = dp x cp x tp x pp; the batch splits over dp (config_check_engines.py)
    size        the model's training state fits the free memory (ltk/models/sizing.py)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

from ltk.models import get_family
from ltk.models.sizing import TRAIN_BYTES, WEIGHT_BYTES, check_fits
from ltk.training.config import ConfigError, RunConfig, did_you_mean
from ltk.training.config_check_engines import check_engines, check_layout

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "fp32", "bf16", "fp16")
REDUCE_DTYPES = ("auto", "fp32", "bf16")
# engines that shard model states over the dp ranks, and what each shards
SHARDS = {"zero1": ("moments",), "zero2": ("moments", "grads"), "zero3": ("moments", "grads", "weights"),
          "fsdp2": ("moments", "grads", "weights")}
SHARDS.update({f"deepspeed-zero{s}": SHARDS[f"zero{s}"] for s in (1, 2, 3)})  # DeepSpeed's stages shard the same


def strategies() -> tuple[str, ...]:
    from ltk.parallel.dp_engines import DP_ENGINES

    return ("auto", "none", *DP_ENGINES)


def check_run(cfg: RunConfig, *, world: int | None = None, local: int | None = None, size: bool = True,
              warn: bool = True) -> list[str]:
    """Raise ConfigError on the first bad value; return the warnings (printed when `warn`, on
    rank 0). `world` (processes) enables the layout checks, `size` the memory check."""
    _check_fields(cfg)
    _check_task(cfg)
    check_model(cfg)
    check_engines(cfg)
    if world is not None:
        check_layout(cfg, world)
    if size:
        _check_size(cfg, world or 1, local)
    found = warnings_of(cfg)
    if warn and os.environ.get("RANK", "0") == "0":
        for w in found:
            print(f"warning: {w}", file=sys.stderr)
    return found


def check_model(cfg: RunConfig) -> None:
    """The family and its config's own rules; vocab_size 0 (taken from the data) passes."""
    fam = get_family(cfg.family)
    if not isinstance(cfg.model, fam.config_cls):
        raise ConfigError(f"family {cfg.family!r} needs a {fam.config_cls.__name__}, got {type(cfg.model).__name__}")
    model = cfg.model
    if getattr(model, "vocab_size", None) == 0:
        model = dataclasses.replace(model, vocab_size=max(cfg.data.vocab_size, 1))
    model.validate()


def check_weights(cfg: RunConfig, source) -> None:
    """A run config read back from `source` (a checkpoint's state.json) before its model is built
    for inference: the family's rules and room for its fp32 weights, errors naming the file."""
    try:
        check_model(cfg)
        check_fits(cfg.model, WEIGHT_BYTES, "cpu")
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def warnings_of(cfg: RunConfig) -> list[str]:
    o, t = cfg.optim, cfg.trainer
    out = []
    if t.max_steps < o.warmup_steps:
        peak = o.lr * t.max_steps / o.warmup_steps
        out.append(f"trainer.max_steps {t.max_steps} is shorter than optim.warmup_steps {o.warmup_steps}: the "
                   f"learning rate never reaches its peak optim.lr {o.lr:g} (it ends at {peak:.3g}); raise "
                   f"--trainer.max_steps or lower --optim.warmup_steps")
    return out


# -- fields ---------------------------------------------------------------------------------
def _at_least(cfg: RunConfig, path: str, low: int, why: str = "") -> None:
    value = _get(cfg, path)
    if value is not None and value < low:
        raise ConfigError(f"--{path} must be >= {low}{why}, got {value}")


def _in_range(cfg: RunConfig, path: str, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """low <= value <= high (open ends exclusive); NaN and infinities never pass."""
    value = _get(cfg, path)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"--{path} must be a finite number in {interval}, got {value}")


def _one_of(cfg: RunConfig, path: str, choices) -> None:
    value = _get(cfg, path)
    if value not in choices:
        raise ConfigError(f"--{path} {value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}")


def _get(cfg: RunConfig, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _check_fields(cfg: RunConfig) -> None:
    inf = math.inf
    for path in ("trainer.max_steps", "trainer.batch_size", "trainer.grad_accum", "trainer.eval_batches",
                 "trainer.log_every", "trainer.profile_steps", "data.max_bytes", "parallel.tp", "parallel.pp",
                 "parallel.virtual_stages", "optim.decay_steps"):
        _at_least(cfg, path, 1)
    _at_least(cfg, "trainer.seq_len", 0, " (0 = the model's block_size)")
    _at_least(cfg, "trainer.eval_every", 0, " (0 = only at the end)")
    _at_least(cfg, "trainer.ckpt_every", 0, " (0 = only at the end)")
    _at_least(cfg, "trainer.keep_last", 0, " (0 = keep every checkpoint)")
    _at_least(cfg, "optim.warmup_steps", 0)
    _at_least(cfg, "data.min_chars", 0)
    if cfg.data.tokenizer is None:
        _at_least(cfg, "data.vocab_size", 257, " (256 byte tokens + end-of-text)")
    _in_range(cfg, "optim.lr", 0, inf, low_open=True, high_open=True)
    _in_range(cfg, "optim.min_lr_ratio", 0, 1)
    _in_range(cfg, "optim.weight_decay", 0, inf, high_open=True)
    _in_range(cfg, "optim.beta1", 0, 1, high_open=True)
    _in_range(cfg, "optim.beta2", 0, 1, high_open=True)
    _in_range(cfg, "optim.eps", 0, inf, low_open=True, high_open=True)
    _in_range(cfg, "optim.grad_clip", 0, inf, high_open=True)
    _in_range(cfg, "data.val_fraction", 0, 1, high_open=True)
    _in_range(cfg, "parallel.bucket_mb", 0, inf, low_open=True, high_open=True)
    _in_range(cfg, "trainer.memory_trace_ms", 1, 60_000)  # below 1 ms the sampler would take a core
    _check_device(cfg.trainer.device)
    _one_of(cfg, "trainer.dtype", DTYPES)
    _one_of(cfg, "parallel.strategy", strategies())
    _one_of(cfg, "parallel.reduce_dtype", REDUCE_DTYPES)
    from ltk.parallel.schedules import SCHEDULES

    _one_of(cfg, "parallel.schedule", tuple(SCHEDULES))
    _one_of(cfg, "parallel.pp_engine", ("ltk", "torch"))
    if not cfg.trainer.out_dir:
        raise ConfigError("--trainer.out_dir is empty: name a run folder")
    positions = getattr(cfg.model, "block_size", None)  # None: relative positions (T5), no limit
    seq_len = cfg.trainer.seq_len or positions or 0
    if seq_len <= 0:
        raise ConfigError(f"set --trainer.seq_len: the {cfg.family} model has no block_size to default to")
    if positions is not None and seq_len > positions:
        raise ConfigError(f"--trainer.seq_len {seq_len} is larger than the model's positions (model.block_size="
                          f"{positions}); lower --trainer.seq_len or raise --model.block_size")


# fine-tuning: replicated (ddp, naive-ddp, torch-ddp) or with the frozen base sharded (zero3, fsdp2)
FINETUNE_ENGINES = ("auto", "none", "ddp", "naive-ddp", "torch-ddp", "zero3", "fsdp2")


def _check_task(cfg: RunConfig) -> None:
    """Fine-tuning: the task, the adapter and what they run on (ltk/training/adapters.py)."""
    from ltk.training.adapters import METHODS

    _one_of(cfg, "task.kind", ("pretrain", "instruct"))
    _one_of(cfg, "adapter.method", METHODS)
    _one_of(cfg, "adapter.compute_dtype", ("fp32", "bf16"))
    _at_least(cfg, "adapter.r", 1)
    _in_range(cfg, "adapter.alpha", 0, math.inf, low_open=True, high_open=True)
    _in_range(cfg, "adapter.dropout", 0, 1, high_open=True)  # p = 1 would drop every input of the adapter
    if cfg.task.kind == "pretrain":
        if cfg.adapter.method != "none":
            raise ConfigError(f"--adapter.method {cfg.adapter.method} adapts a base model: it needs --task.kind "
                              "instruct and --task.base (ltk finetune)")
        return
    _at_least(cfg, "task.max_len", 2, " (a prompt token and the token it predicts)")
    _at_least(cfg, "task.eval_examples", 1)
    if cfg.task.limit is not None:
        _at_least(cfg, "task.limit", 2, " (an example to train on and one to validate with)")
    _in_range(cfg, "task.val_fraction", 0, 1, low_open=True, high_open=True)
    _check_task_data(cfg)
    positions = getattr(cfg.model, "block_size", None)
    if positions is not None and cfg.task.max_len > positions:
        raise ConfigError(f"--task.max_len {cfg.task.max_len} is longer than the base model's {positions} positions")
    p = cfg.parallel
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(f"fine-tuning does not combine with tensor or pipeline parallelism (tp {p.tp}, pp {p.pp}): "
                          "adapters on a split or staged base are not implemented; shard the base over data-parallel "
                          "ranks instead (--parallel zero3 or fsdp2)")
    if p.strategy not in FINETUNE_ENGINES:
        raise ConfigError(f"fine-tuning runs on one process or the data-parallel engines "
                          f"{', '.join(FINETUNE_ENGINES[2:])}, not --parallel.strategy {p.strategy}")


def _check_task_data(cfg: RunConfig) -> None:
    """Streaming and chat templates (ltk/training/instruct_stream.py, chat_template.py) read a .jsonl
    file; the template is loaded here, so a folder without one is named before the base loads."""
    task = cfg.task
    _at_least(cfg, "task.val_rows", 1)
    if not (task.stream or task.chat_template is not None):
        return
    flag = "--task.stream" if task.stream else "--task.chat_template"
    if task.data == "builtin" or task.data.startswith("builtin:") or not task.data.endswith(".jsonl"):
        raise ConfigError(f"{flag} reads a .jsonl file of Alpaca or chat rows, not --task.data {task.data!r}")
    if task.stream:
        _at_least(cfg, "task.stream_buffer", 1, " (rows held for the shuffle)")
        if task.limit is not None:
            raise ConfigError("--task.limit takes the first rows into memory and --task.stream reads the whole "
                              "file: give one of them")
    if task.chat_template is not None:
        from ltk.training.chat_template import template_for

        if task.chat_template == "base" and not task.base:
            raise ConfigError("--task.chat_template base takes the template of --task.base, which is not set")
        try:
            template_for(task.chat_template, task.base)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--task.chat_template {task.chat_template}: {e}") from None


def _check_device(name: str) -> None:
    import torch

    m = DEVICE.match(name)
    if not m:
        raise ConfigError(f"--trainer.device {name!r}: choose auto, cpu, cuda or cuda:N"
                          + did_you_mean(name, ("auto", "cpu", "cuda")))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--trainer.device {name}: CUDA is not available on this machine (use cpu or auto)")
    if m.group(2) and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--trainer.device {name}: this machine has {torch.cuda.device_count()} CUDA devices "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


# -- size -----------------------------------------------------------------------------------
def _check_size(cfg: RunConfig, world: int, local: int | None) -> None:
    """Each rank builds the whole fp32 model before any split (4 bytes per parameter), then holds
    its share of weights, gradients and AdamW's moments; ranks on a CPU share the host's memory."""
    from ltk.training.runtime import resolve_device

    model = cfg.model
    if getattr(model, "vocab_size", None) == 0:  # taken from the data: the tokenizer's size
        model = dataclasses.replace(model, vocab_size=cfg.data.vocab_size)
    p = cfg.parallel
    split = p.tp * p.pp
    dp = max(1, world // split)
    sharded = SHARDS.get(p.strategy, ())
    parts = {"weights": 4, "grads": 4, "moments": 8}  # bytes per parameter, TRAIN_BYTES in all
    state = sum(b / split / (dp if part in sharded else 1) for part, b in parts.items())
    local = local or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        check_fits(model, WEIGHT_BYTES, "cpu", what="fp32 weights, built on the host", copies=local)
        check_fits(model, state, device, what="this rank's fp32 weights, gradients and AdamW moments")
    else:
        share = " (this rank's share)" if state < TRAIN_BYTES else ""
        check_fits(model, max(WEIGHT_BYTES, state), "cpu", copies=local,
                   what="fp32 weights, gradients and AdamW moments" + share)
