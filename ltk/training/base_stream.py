"""The base of a fine-tuning run read tensor by tensor from its files, with a ledger of the bytes
that reading holds at once.

    reader = BaseReader(base)          # opens the files, reads their headers; no tensor read
    w = reader.read("h.0.attn.c_attn.weight")     # one tensor, under our name, on the CPU
    reader.ledger.peak                 # the most bytes of base tensors alive at one time

Sources. One of our checkpoints, consolidated or sharded, through the resume path's readers
(ltk/training/sharded_checkpoint.py: safetensors `get_slice`, only that tensor's bytes). A Hugging
Face folder of .safetensors files (one, or shards named by model.safetensors.index.json):
`safe_open` per file, each tensor renamed to ours as ltk/models/hf/ converts whole state dicts
(GPT-2: the `transformer.` prefix dropped, Conv1D weights transposed; Llama: the name pairs), so
`read(name)` equals `read_folder(path)[2][name]`. A folder of pickled .bin files cannot be read a
tensor at a time: it is converted whole once, on the CPU (the ledger then says so).

Why a ledger. Sharded set-up (ltk/training/instruct_setup.py) must never hold the whole frozen
base on a rank; what it holds besides its shard is what the reader hands out (and the values made
from it: `ledger.hold` on a full-size copy, NF4 codes). Each held tensor counts its bytes until it
is freed (a weakref finalizer: CPython frees a tensor when its last reference goes), and `peak`
is the maximum of the running sum: the measured bound of "one tensor at a time".
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch

from ltk.training.base_model import Base


class Ledger:
    """Bytes of the tensors held now (`live`), their maximum (`peak`), and what was read."""

    def __init__(self):
        self.live = self.peak = self.read_bytes = self.reads = 0

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, n)
        return t

    def count(self, n: int) -> None:
        """n bytes held until the end (a base converted whole)."""
        self.live += n
        self.peak = max(self.peak, self.live)

    def _release(self, n: int) -> None:
        self.live -= n

    def summary(self) -> dict[str, int]:
        return {"peak_bytes": self.peak, "read_bytes": self.read_bytes, "tensors_read": self.reads}


class BaseReader:
    """One tensor of the base at a time, under our parameter names (module docstring)."""

    def __init__(self, base: Base):
        self.base, self.ledger = base, Ledger()
        self.caches: list = []  # what keeps values for the tags (instruct_setup): cleared on close
        self._whole: dict[str, torch.Tensor] | None = None
        if not base.hf:
            from ltk.training.sharded_checkpoint import open_reader

            self._ckpt = open_reader(base.path)
            self._names = set(self._ckpt.names())
            return
        self._ckpt = None
        self._sources = _hf_sources(base.path, base.family, base.model_cfg)
        if self._sources is None:  # .bin files: converted whole, once
            from ltk.models.hf.folder import read_folder

            self._whole = read_folder(base.path)[2]
            self.ledger.count(sum(t.numel() * t.element_size() for t in self._whole.values()))  # all of it, held
            self._names = set(self._whole)
        else:
            self._names = set(self._sources)
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return self._names

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` (our name), whole, on the CPU, in its saved dtype."""
        if name not in self._names:
            raise KeyError(f"the base {self.base.path} has no tensor {name} (it has {len(self._names)} others)")
        if self._whole is not None:
            t = self._whole[name]
        elif self._ckpt is not None:
            t = self._ckpt.read(name)
        else:
            from safetensors import safe_open

            file, theirs, transpose = self._sources[name]
            if file not in self._open:
                self._open[file] = safe_open(str(file), framework="pt")
            t = self._open[file].get_tensor(theirs)
            if transpose:  # Conv1D (in, out) -> Linear (out, in)
                t = self.ledger.hold(t).t().contiguous()
        self.ledger.reads += 1
        self.ledger.read_bytes += t.numel() * t.element_size()
        return t if self._whole is not None else self.ledger.hold(t)

    def close(self) -> None:
        """Close the files and drop every value kept for loading (the tags on the parameters remain)."""
        for c in self.caches:
            c.clear()
        if self._ckpt is not None:
            self._ckpt.__exit__(None, None, None)
        self._open, self._whole = {}, None


def _hf_sources(folder: Path, family: str, cfg) -> dict[str, tuple[Path, str, bool]] | None:
    """ours -> (file, transformers name, transpose) for a folder of .safetensors files; None for .bin."""
    from safetensors import safe_open

    from ltk.models.files import read_json

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = {theirs: folder / f for theirs, f in read_json(index)["weight_map"].items()}
    elif (folder / "model.safetensors").exists():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            files = {theirs: folder / "model.safetensors" for theirs in f.keys()}
    else:
        return None
    if family == "gpt":
        from ltk.models.hf.gpt2 import _CONV1D, _MASK_BUFFER

        out = {}
        for theirs, file in files.items():
            ours = theirs.removeprefix("transformer.")
            if not (_MASK_BUFFER.search(ours) or ours == "lm_head.weight"):  # buffers; the head is wte
                out[ours] = (file, theirs, ours.endswith(_CONV1D))
        return out
    if family == "llama":
        from ltk.models.hf.llama import _name_pairs

        return {ours: (files[theirs], theirs, False) for ours, theirs in _name_pairs(cfg) if theirs in files}
    raise ValueError(f"streaming a {family} base from a Hugging Face folder is not supported (gpt, llama)")
