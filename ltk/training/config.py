"""Typed run configuration: one dataclass per component, nested into one `RunConfig`.

    RunConfig
    ├── model:   models.gpt.GPTConfig     (architecture)
    ├── data:    DataConfig               (source, cleaning, tokenizer, split)
    ├── optim:   OptimConfig              (AdamW, schedule, clipping)
    ├── trainer: TrainerConfig            (steps, batch, device, eval, checkpoints)
    ├── parallel: ParallelConfig          (DDP / ZeRO engine, tensor and pipeline degrees)
    ├── task:    TaskConfig               (pre-training, or instruction tuning of a base model)
    └── adapter: AdapterConfig            (none, LoRA or QLoRA on the model's projections)

Pre-training and fine-tuning are one loop (ltk/training/trainer.py): `ltk finetune` fills in
`task` and `adapter` and runs the same Trainer as `ltk train`.

Presets are plain Python functions (ltk/training/presets.py) that return a RunConfig; the
command line overrides any field by its dotted path, e.g. `--trainer.max_steps 200` or
`--model.n_layer=4`; a file (ltk/training/config_file.py) sets any subset of the fields. An
unknown field is an error that suggests the nearest valid one: a typo must never be silently
ignored. Values are type-checked here; their ranges are checked in ltk/training/config_check.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ltk.models import get_family
from ltk.models.gpt import GPTConfig


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token shards (ltk/training/data.py)."""

    source: str = "embedded"  # "embedded" (stdlib sources), a text file or folder, *.jsonl, *.parquet
    text_field: str = "text"  # field holding the document in JSONL / Parquet rows
    tokenizer: str | None = None  # tokenizer.json or HF folder; None = train byte-level BPE here
    vocab_size: int = 2048  # BPE vocabulary when training the tokenizer (special tokens included)
    min_chars: int = 64  # documents shorter than this (after cleaning) are dropped
    val_fraction: float = 0.05  # share of documents held out, chosen by a hash of their text
    max_bytes: int = 6_000_000  # cap on the embedded corpus (bytes of source files read)
    cache_dir: str | None = None  # prepared datasets live here; default $LTK_CACHE or ~/.cache/ltk


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup and cosine decay."""

    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: decay over trainer.max_steps
    weight_decay: float = 0.1  # applied to matrices only (2-D weights); not to biases, norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm; 0 disables


@dataclass
class TrainerConfig:
    """The loop: how many steps, how big, where, and what gets written."""

    max_steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch, over all data-parallel ranks together
    seq_len: int = 0  # tokens per sequence; 0 = the model's block_size (no longer than it)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (bf16 weights, fp32 master) | fp16
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward
    eval_every: int = 100  # steps between evaluations; 0 = only at the end
    eval_batches: int = 20  # micro-batches of the validation split per evaluation
    log_every: int = 10
    ckpt_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # checkpoints kept in the run folder; 0 keeps them all
    out_dir: str = "runs/train"
    progress: bool = True  # tqdm progress bar
    log_to: str = "jsonl"  # comma list of sinks: jsonl (metrics.jsonl, always), tensorboard, wandb (loggers.py)
    timeline: bool = True  # multi-process: per-rank compute / exposed comm / idle per step -> timeline.json, .png
    profile: bool = False  # torch.profiler trace of a few steps, NVML GPU counters, CUDA memory snapshot -> profile/
    profile_steps: int = 3  # steps the profiler records (after one skipped and one warm-up step)
    memory_trace: bool = False  # sample each rank's memory over the run -> memory/rank{r}.jsonl, memory.png
    memory_trace_ms: float = 25.0  # milliseconds between memory samples


@dataclass
class ParallelConfig:
    """How a multi-process run splits the work (ltk/parallel/). The ranks form a pp x dp x cp x tp
    mesh (dp = world / (tp · cp · pp)); trainer.batch_size x grad_accum is the *global* batch, the same
    whatever the world size, so runs at different sizes are comparable step by step."""

    # data-parallel engine: auto | ddp | naive-ddp | zero1 | zero2 | zero3 | torch-ddp, or PyTorch's DTensor
    # engines fsdp2 (fully_shard; with tp > 1 over DTensor TP) | torch-tp (DTensor TP over every rank)
    strategy: str = "auto"
    tp: int = 1  # tensor-parallel degree (GPT, Llama)
    pp: int = 1  # pipeline stages (GPT)
    sequence_parallel: bool = False  # with tp > 1: norms and dropout on sequence shards
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b | interleaved
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved)
    pp_engine: str = "ltk"  # pipeline executor: ltk (ltk/parallel/pipeline.py) | torch (torch.distributed.pipelining)
    bucket_mb: float = 25.0  # DDP gradient bucket size
    reduce_dtype: str = "auto"  # gradient reduction: auto (the gradients' dtype) | fp32 | bf16
    reshard_after_forward: bool = True  # fsdp2: free gathered blocks after forward (ZeRO-3) or keep them (ZeRO-2)
    cp: int = 1  # context-parallel degree: ranks each sequence is split over (ltk/parallel/cp_train.py; GPT, Llama)
    cp_impl: str = "ring"  # context-parallel attention: ring (K/V go around) | ulysses (all-to-all; heads % cp·tp)
    cp_layout: str = "zigzag"  # sequence split: zigzag (balanced causal work) | contiguous


@dataclass
class TaskConfig:
    """What the loop learns. pretrain: the family's objective on `data` (ltk/training/objectives.py).
    instruct: (prompt, response) examples, the loss on the response only (ltk/training/instruct.py),
    starting from the weights of `base`, whose architecture and tokenizer the run takes."""

    kind: str = "pretrain"  # pretrain | instruct
    base: str = ""  # instruct: one of our run folders / checkpoints, or a Hugging Face folder
    data: str = "builtin"  # instruct: builtin | builtin:KIND,... | a .jsonl file (Alpaca or chat rows)
    max_len: int = 128  # instruct: tokens per example (prompt + response + end-of-text); per row when packing
    packing: bool = False  # instruct: pack each step's examples into rows of max_len (ltk/training/packing.py)
    val_fraction: float = 0.1  # instruct: share of the examples held out (identical prompts on one side)
    eval_examples: int = 64  # instruct, built-in task: validation examples scored by exact match
    limit: int | None = None  # instruct: use at most this many examples
    stream: bool = False  # instruct: read `data` (.jsonl) row by row through a shuffle buffer (instruct_stream.py)
    stream_buffer: int = 1024  # instruct, stream: rows in the shuffle buffer (memory is O(buffer), not O(file))
    val_rows: int = 1000  # instruct, stream or chat_template: at most this many val rows (hash split), encoded once
    chat_template: str | None = None  # instruct: a HF folder with a chat_template (chat_template.py), or "base"


@dataclass
class AdapterConfig:
    """What trains (ltk/training/adapters.py): every weight (none), or low-rank adapters on a frozen
    base (lora, Hu et al. 2021), the base stored in NF4 (qlora, Dettmers et al. 2023)."""

    method: str = "none"  # none | lora | qlora
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r
    targets: str = ""  # comma list of module name patterns; "" = every projection of the blocks
    compute_dtype: str = "fp32"  # qlora: fp32 | bf16, what the 4-bit layers' matmuls run in


@dataclass
class RunConfig:
    name: str = "gpt-debug"
    family: str = "gpt"  # gpt | llama | bert | t5 (ltk/models/__init__.py): the type of `model`
    model: Any = field(default_factory=GPTConfig)  # the family's config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """The config a dict describes; missing fields take the dataclass defaults."""
        family = d.get("family", "gpt")
        if not isinstance(family, str):
            raise ConfigError(f"family: expected a string, got {family!r}")
        return apply_dict(cls(family=family, model=get_family(family).config_cls()), d)


class ConfigError(ValueError):
    """A bad preset, field or value; the message names it and what is valid."""


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """The hint '; did you mean X?' for the closest of `choices` (difflib), or '' when none is."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def apply_dict(cfg: RunConfig, d: dict[str, Any]) -> RunConfig:
    """Set the fields a (possibly partial) nested dict names, type-checked, in place. A `family`
    other than the config's starts `model` from that family's defaults."""
    if not isinstance(d, dict):
        raise ConfigError(f"expected a table of config sections, got {type(d).__name__}")
    family = d.get("family", cfg.family)
    if not isinstance(family, str):
        raise ConfigError(f"family: expected a string, got {family!r}")
    fam = get_family(family)
    if not isinstance(cfg.model, fam.config_cls):
        cfg.model = fam.config_cls()
    _merge(cfg, d, "")
    return cfg


def _merge(obj: Any, d: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in d.items():
        if name not in names:
            hint = did_you_mean(prefix + name, [prefix + n for n in names])
            section = prefix.rstrip(".") or "the run config"
            raise ConfigError(f"unknown config field {prefix}{name}"
                              + (hint or f"; fields of {section}: " + ", ".join(names)))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} is a section: expected a table of its fields, got {value!r}")
            _merge(current, value, f"{prefix}{name}.")
        else:
            setattr(obj, name, _typed(value, hints[name], prefix + name))


def _typed(value: Any, t: Any, path: str) -> Any:
    """A value read from a file, checked against the field's declared type. As on the command
    line, "none" means None for an optional field (TOML has no null), and 5e3 reads as an int."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        if value is None or isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if t is bool and isinstance(value, bool):
        return value
    if t is int and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) or value.is_integer():
            return int(value)
    if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if t is str and isinstance(value, str):
        return value
    if t not in (bool, int, float, str):
        return value
    raise ConfigError(f"{path}: expected {'an' if t is int else 'a'} {t.__name__}, got {value!r}")


def _field_paths(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _field_paths(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _coerce(text: str, t: Any, path: str) -> Any:
    """Parse a command-line string into the field's declared type."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _coerce(text, args[0], path)
    try:
        if t is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if t is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"--{path}: cannot read {text!r} as {getattr(t, '__name__', t)}") from None


def apply_override(cfg: RunConfig, path: str, text: str) -> None:
    """Set the field at dotted `path` (e.g. "trainer.max_steps") from its string form."""
    parts = path.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config field --{path}: {'.'.join(parts[:i])} is a field, not a section")
        if part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config field --{path}{_suggest(cfg, path, parts[:i])}")
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    leaf = parts[-1]
    if dataclasses.is_dataclass(getattr(obj, leaf)):
        first = dataclasses.fields(getattr(obj, leaf))[0].name
        raise ConfigError(f"--{path} is a group; set one of its fields, e.g. --{path}.{first}")
    t = typing.get_type_hints(type(obj))[leaf]
    setattr(obj, leaf, _coerce(text, t, path))


def _suggest(cfg: RunConfig, path: str, good: list[str]) -> str:
    """The nearest field (a misspelt field or section, or a field without its section: --lr);
    else the fields of the deepest section spelt right, not all 50-odd of them."""
    paths = _field_paths(cfg)
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return f"; did you mean --{same_leaf[0]}?"
    section = cfg
    for part in good:
        section = getattr(section, part)
    names = [f.name for f in dataclasses.fields(section)]
    wrong = path.split(".")[len(good)]
    close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean --{'.'.join([*good, close[0]])}?"
    if not good:
        close = difflib.get_close_matches(path, paths, n=1, cutoff=0.6)
        if close:
            return f"; did you mean --{close[0]}?"
    return f"; fields of {'.'.join(good) or 'the run config'}: " + ", ".join(names)


def apply_overrides(cfg: RunConfig, args: list[str]) -> RunConfig:
    """Apply `--a.b value` / `--a.b=value` pairs from a command line, in order."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected a --section.field override, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} needs a value")
            value = args[i + 1]
            i += 2
        apply_override(cfg, key.replace("-", "_"), value)
    return cfg
