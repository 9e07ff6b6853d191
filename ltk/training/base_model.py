"""The model a fine-tuning run starts from: one of our run folders / checkpoints, or a Hugging
Face folder; its architecture, its weights, its tokenizer, and a reference that pins it.

`open_base(path)` reads the architecture only (state.json's run config, or config.json), so a
run config can be checked before any weight is read; `Base.tensors()` then reads the weights
under our parameter names. A LoRA / QLoRA checkpoint does not copy the frozen base: it holds
`Base.reference()`, the base's path and the size and SHA-256 of each of its weight files, and
a resume refuses a base whose files changed (`check_reference`), since the adapters were
trained against those exact weights. Our checkpoints have the hashes in their manifest already;
a Hugging Face folder's weight files are hashed once per start.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CAUSAL_FAMILIES = ("gpt", "llama")  # fine-tuning takes a causal LM


@dataclass
class Base:
    path: Path  # the HF folder, or the checkpoint folder (a run folder resolved to its newest)
    hf: bool
    family: str
    model_cfg: Any  # the family's config dataclass
    tok_dir: Path  # the folder holding tokenizer.json

    def tensors(self) -> dict[str, torch.Tensor]:
        """The base's weights under our parameter names (a checkpoint's verified against its manifest)."""
        if self.hf:
            from ltk.models.hf.folder import read_folder

            return read_folder(self.path)[2]
        from ltk.training.checkpoint import full_model_state

        return full_model_state(self.path)

    def reference(self) -> dict[str, Any]:
        """{"path", "files": {name: {"bytes", "sha256"}}} of the weight files (and config)."""
        from ltk.training.checkpoint import _sha256, read_manifest

        if self.hf:
            names = sorted(p.name for p in self.path.iterdir()
                           if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
            files = {n: {"bytes": (self.path / n).stat().st_size, "sha256": _sha256(self.path / n)} for n in names}
        else:
            files = {n: m for n, m in read_manifest(self.path).items()
                     if n.endswith(".safetensors") or n in ("state.json", "index.json")}
        return {"path": str(self.path), "files": files}


def open_base(path: str | Path) -> Base:
    """The base at `path`: its family and model config, no weights read."""
    from ltk.models import get_family
    from ltk.models.hf.folder import is_hf_folder, read_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the base {path} does not exist: give one of our run folders / checkpoints "
                                "or a Hugging Face folder")
    if is_hf_folder(path):
        model_cls, model_cfg, _ = read_config(path)
        family = next((f for f in CAUSAL_FAMILIES if get_family(f).model_cls is model_cls), model_cls.__name__)
        base = Base(path, True, family, model_cfg, path)
    else:
        from ltk.training.checkpoint import read_state
        from ltk.training.config_check import check_weights
        from ltk.training.config_file import config_from_dict

        ckpt, state = read_state(path)
        cfg = config_from_dict(state["config"], ckpt / "state.json")
        check_weights(cfg, ckpt / "state.json")  # absurd sizes refused before the model is built
        base = Base(ckpt, False, cfg.family, cfg.model, ckpt)
    if base.family not in CAUSAL_FAMILIES:
        raise ValueError(f"{path}: fine-tuning takes a causal LM (gpt or llama), not a {base.family} model")
    if not (base.tok_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{base.tok_dir} has no tokenizer.json: the base needs its tokenizer")
    return base


def check_reference(saved: dict[str, Any], base: Base, ckpt: Path) -> None:
    """Refuse resuming the adapters of checkpoint `ckpt` on a base other than the one they were trained on."""
    from ltk.training.checkpoint import CheckpointError

    now = base.reference()
    if Path(saved["path"]).resolve() != Path(now["path"]).resolve():
        raise CheckpointError(f"{ckpt} holds adapters trained on the base {saved['path']}, not {now['path']}: "
                              "resume with that --base")
    for name in sorted(set(saved["files"]) | set(now["files"])):
        old, new = saved["files"].get(name), now["files"].get(name)
        if old != new:
            what = ("is gone" if new is None else "is new" if old is None
                    else f"changed ({old['bytes']} -> {new['bytes']} bytes, SHA-256 {new['sha256'][:12]}, "
                         f"was {old['sha256'][:12]})")
            raise CheckpointError(f"the base's {Path(now['path']) / name} {what} since {ckpt} was saved: "
                                  "its adapters were trained on the old weights; refusing to resume")


def load_base(path: str | Path, device: torch.device):
    """(model, tokenizer, family): the base as a model of ours, its weights loaded (for inference
    and the tests; a training run builds it through the Trainer)."""
    from ltk.models import get_family
    from ltk.training.checkpoint import restore_model
    from ltk.training.tokenizer import Tokenizer

    base = open_base(path)
    model = get_family(base.family).model_cls(base.model_cfg)
    restore_model(model, base.tensors())
    return model.to(device), Tokenizer.load(base.tok_dir), base.family


def adopt_base(cfg) -> Base | None:
    """Fine-tuning (task.kind instruct): open task.base and give the run config its family and
    model config, so the run is checked and built as the base's architecture. None otherwise."""
    if cfg.task.kind != "instruct":
        return None
    if not cfg.task.base:
        from ltk.training.config import ConfigError

        raise ConfigError("--task.base is required with --task.kind instruct: one of our run folders / "
                          "checkpoints, or a Hugging Face folder (ltk finetune --base)")
    base = open_base(cfg.task.base)
    cfg.family, cfg.model = base.family, base.model_cfg
    return base
