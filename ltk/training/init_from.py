"""Continued pre-training: a run's initial weights from a Hugging Face folder or one of our runs.

    ltk train --init-from hf/gpt2 --data corpus.txt           # a transformers folder (GPT-2, Llama, BERT, T5)
    ltk train --init-from runs/gpt-debug --data more.txt      # one of our run folders or checkpoints

nanoGPT's `init_from='gpt2'`. What is taken from the source, and what is not:

    model config   the source's (family, shape); --model.* may change only what leaves the
                   weights' meaning intact (RUNTIME_FIELDS: dropout, kernels, the head's loss)
    weights        the source's, loaded into whatever this rank holds (below)
    tokenizer      the source's: the HF folder's tokenizer.json (+ tokenizer_config.json's eos),
                   or the checkpoint's tokenizer.json; the new data is tokenized with it
    optimizer      fresh AdamW moments, step 0, the schedule from its start, the data from its start

This is not `--resume`, which continues one run exactly (its optimizer, step, data position and
RNG); the two are refused together (`--resume auto` is allowed: its fresh start initializes from
the source, its restarts continue the run's own checkpoints).

Loading goes through the resume path's per-rank reader (ltk/training/reshard.py,
`load_local_state(..., optimizer=False)`): every rank copies only the boxes it holds — a ZeRO-3 or
FSDP2 shard, a tensor-parallel slice, a pipeline stage — into the engine built on the meta device,
so no rank ever holds the whole model on its accelerator. Our checkpoints (sharded or consolidated)
are read box by box from disk; a transformers folder is converted to our names first
(ltk/models/hf/, strict: a missing or misshapen tensor is an error naming it), on the CPU.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ltk.models import FAMILIES
from ltk.training.config import ConfigError

# model fields that do not change what the source's weights compute: --model.X may set them
RUNTIME_FIELDS = {"dropout", "backend", "loss"}
DEBUG_PRESETS = {"gpt": "gpt-debug", "llama": "llama-debug", "bert": "bert-debug", "t5": "t5-debug"}


@dataclass
class InitSource:
    path: Path  # the transformers folder, or the checkpoint folder (a run folder's newest)
    kind: str  # "hf" | "run"
    family: str
    model: Any  # the family's config dataclass
    tokenizer: Path  # what DataConfig.tokenizer loads: the HF folder, or the checkpoint's tokenizer.json

    def describe(self) -> str:
        what = "Hugging Face folder" if self.kind == "hf" else "checkpoint"
        return f"{self.family} weights of the {what} {self.path}"


def read_init_source(path: str | Path) -> InitSource:
    """What `path` holds (config and tokenizer; no weights read): a transformers folder
    (config.json naming an architecture), or one of our run folders / checkpoint folders."""
    from ltk.models.hf.folder import is_hf_folder

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--init-from {path}: no such file or folder")
    if is_hf_folder(path):
        return _hf_source(path)
    from ltk.training.checkpoint import CheckpointError, read_state

    try:
        ckpt, state = read_state(path)
    except CheckpointError as e:
        raise ValueError(f"--init-from {path} is neither a Hugging Face model folder (config.json naming an "
                         f"architecture) nor one of our run folders or checkpoints ({e})") from None
    from ltk.training.config_check import check_weights
    from ltk.training.config_file import config_from_dict

    cfg = config_from_dict(state["config"], ckpt / "state.json")
    check_weights(cfg, ckpt / "state.json")  # an absurd size refused before anything is built
    tok = ckpt / "tokenizer.json"
    if not tok.is_file():
        raise FileNotFoundError(f"--init-from {path}: {ckpt} has no tokenizer.json; the model needs its tokenizer")
    return _checked(InitSource(ckpt, "run", cfg.family, cfg.model, tok))


def _hf_source(folder: Path) -> InitSource:
    from ltk.models.files import read_json
    from ltk.models.hf.folder import ARCHITECTURES

    hf = read_json(folder / "config.json")
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"--init-from {folder}: architectures {archs} are not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    model_cls, conv = ARCHITECTURES[arch]
    family = next(f.name for f in FAMILIES.values() if f.model_cls is model_cls)
    try:
        model = conv.config_from_hf(hf)
        model.validate()
    except KeyError as e:
        raise ValueError(f"{folder / 'config.json'}: missing field {e}") from None
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--init-from {folder}: no tokenizer.json (the data is tokenized with the model's "
                                "own tokenizer; save it as a fast tokenizer: AutoTokenizer(...).save_pretrained)")
    return _checked(InitSource(folder, "hf", family, model, folder))


def _checked(src: InitSource) -> InitSource:
    """Refuse a tokenizer the model has no rows for: its size plus the ids the objective adds
    above it (BERT's [MASK], T5's sentinels: ltk/training/objectives.py) must fit model.vocab_size."""
    from ltk.training.objectives import objective_for
    from ltk.training.tokenizer import Tokenizer

    tok = Tokenizer.load(src.tokenizer)
    objective = objective_for(src.family, tok.vocab_size, tok.eot_id)
    need = tok.vocab_size + objective.extra_tokens
    if need > src.model.vocab_size:
        extra = f" + {objective.extra_tokens} for the {objective.name} objective's ids above it" \
            if objective.extra_tokens else ""
        raise ValueError(f"--init-from {src.path}: the tokenizer has {tok.vocab_size} tokens{extra}, but the "
                         f"model has {src.model.vocab_size} embedding rows; continued pre-training needs a row "
                         "for every id")
    return src


def adopt_init_source(cfg, src: InitSource, preset: str | None = None) -> None:
    """Make `cfg` (a preset or config file) train the source's model with its tokenizer. A preset
    of another family is refused: its settings (learning rate, objective) were chosen for another model."""
    if cfg.family != src.family:
        hint = f"--preset {DEBUG_PRESETS[src.family]}" if src.family in DEBUG_PRESETS else "a preset of that family"
        raise ConfigError(f"--init-from: {src.path} holds a {src.family} model but {preset or 'the config'} "
                          f"trains a {cfg.family} one; give {hint}, or no preset")
    cfg.model = copy.deepcopy(src.model)
    cfg.data.tokenizer = str(src.tokenizer)


def check_model_overrides(cfg, src: InitSource) -> None:
    """After --model.* overrides: any field the source fixes (its shape, norms, positions) that now
    differs is refused, naming the checkpoint's value."""
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(src.model)
    for name, value in ours.items():
        if name not in RUNTIME_FIELDS and value != theirs.get(name):
            raise ConfigError(f"--model.{name} {value!r} contradicts --init-from {src.path}, whose model has "
                              f"{name} = {theirs.get(name)!r}; the weights fix it (only "
                              f"{', '.join(sorted(RUNTIME_FIELDS))} may be changed)")


class TensorReader:
    """The reader interface of ltk/training/sharded_checkpoint.py over tensors in memory (a
    converted transformers folder): parameters only, no optimizer state."""

    by_position = False
    param_groups: list = []

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path, self.tensors, self.trainer = path, tensors, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tensors = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def kinds(self, name: str) -> list[str]:
        return ["param"]

    def scalars(self, name: str) -> dict[str, Any]:
        return {}

    def read(self, name: str, kind: str = "param", offsets=None, sizes=None) -> torch.Tensor:
        t = self.tensors[name]
        if offsets is None:
            return t
        return t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def _hf_reader(folder: Path, names: list[str]) -> TensorReader:
    """The folder's tensors under our names, tied aliases dropped (the model holds them once)."""
    from ltk.models.hf.folder import read_folder

    _, _, tensors = read_folder(folder)
    ours = set(names)
    by_storage = {t.untyped_storage().data_ptr() for n, t in tensors.items() if n in ours}
    aliases = [n for n, t in tensors.items() if n not in ours and t.untyped_storage().data_ptr() in by_storage]
    return TensorReader(folder, {n: t for n, t in tensors.items() if n not in aliases})


@torch.no_grad()
def load_initial_weights(run, src: InitSource) -> None:
    """Fill the engine `run` (any layout; built with random or meta weights) with the source's
    weights, this rank's boxes only; the optimizer state stays fresh."""
    from ltk.training.reshard import load_local_state, model_names
    from ltk.training.sharded_checkpoint import open_reader

    reader = _hf_reader(src.path, model_names(run)) if src.kind == "hf" else open_reader(src.path)
    with reader:
        load_local_state(run, reader, optimizer=False)
