"""Checkpoints that survive a crash mid-save and refuse to load when damaged.

A checkpoint is a folder:

    step_000200/
        model.safetensors   the weights (safetensors: no pickle, memory-mappable)
        trainer.pt          optimizer state and RNG states (tensors only; loaded weights_only)
        state.json          step, tokens seen, data-loader position, the run config, Python RNG
        manifest.json       SHA-256 and size of each file above, written last

Atomicity: everything is written into a hidden temporary folder next to the target,
fsynced, and then renamed to its final name. A rename within one file system is atomic,
so a reader sees either the whole new checkpoint or none of it; an interrupted save
leaves only a `.tmp-*` folder that is ignored (and cleaned up by the next save), and the
previous checkpoint still loads.

Integrity: `load_checkpoint` recomputes every file's hash and compares it with the
manifest; a mismatch (truncated copy, bit rot, a hand-edited file) is refused with an
error that names the file, instead of resuming from garbage. The files themselves are read by
ltk/models/files.py, so a file that is damaged anyway (bad JSON, a cut safetensors file, a pickle
holding more than tensors) is refused with its name too, never unpickled beyond tensors.

Multi-process runs write the sharded form instead (ltk/training/sharded_checkpoint.py: one file
of boxes per rank, index.json, the same manifest and the same atomic rename); `load_checkpoint`
reads both, and `full_model_state` gives the single-process state dict of either.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ltk.models.files import BadFileError, load_safetensors, load_tensors_only, read_json

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged."""


class Checkpoint:
    """A verified checkpoint folder: `state` (state.json), and the single-process `model` weights and
    `trainer` state (optimizer by parameter name, RNG). A sharded checkpoint reads those two only when
    asked, consolidating on one process; a training run resumes it box by box instead
    (`open_reader`, ltk/training/reshard.py)."""

    def __init__(self, path: Path, state: dict[str, Any], model: dict[str, torch.Tensor] | None = None,
                 trainer: dict[str, Any] | None = None, sharded: bool = False):
        self.path, self.state, self.sharded = path, state, sharded
        self._model, self._trainer = model, trainer

    @property
    def model(self) -> dict[str, torch.Tensor]:
        if self._model is None:
            self._model = full_model_state(self.path)
        return self._model

    @property
    def trainer(self) -> dict[str, Any]:
        if self._trainer is None:
            from ltk.training.sharded_checkpoint import consolidated_trainer_state

            self._trainer = consolidated_trainer_state(self.path)
        return self._trainer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory. Keep the first name of a tied tensor
    (the embedding/head: `restore_model` re-ties it through the module) and copy apart views
    that only share a storage."""
    seen: set[tuple] = set()
    out = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().clone()
    return out


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 3,
    extra_files: dict[str, str | Path] | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_{step:06d}` atomically; keep the newest `keep_last`.
    `extra_files` (name -> source path) are copied in and covered by the manifest too
    (the tokenizer, so a checkpoint folder is enough to generate text)."""
    tmp = new_tmp_dir(run_dir, step)  # stale .tmp-* of an interrupted save removed
    try:
        save_file(_unshare(model_state), str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        return publish(tmp, run_dir, step, ["model.safetensors", "trainer.pt", "state.json"], extra_files,
                       keep_last=keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, run_dir: str | Path, step: int, files: list[str], extra_files: dict | None = None,
            hashed: dict[str, dict] | None = None, *, keep_last: int = 3, fmt: int = 1) -> Path:
    """Finish a checkpoint written into `tmp`: copy the extra files in, write the manifest (SHA-256
    and size of `files`, plus `hashed` ones already measured by their writers), fsync, rename
    to checkpoints/step_{step:06d} (atomic), keep the newest keep_last."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    files = list(files)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
        files.append(name)
    manifest = {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}
    for f in files:
        with open(tmp / f, "rb+") as fh:
            os.fsync(fh.fileno())
    manifest.update(hashed or {})
    (tmp / MANIFEST).write_text(json.dumps({"format": fmt, "files": manifest}, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".tmp-old-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def new_tmp_dir(run_dir: str | Path, step: int) -> Path:
    """The hidden folder a save writes into, next to its final place; stale ones of interrupted
    saves are removed first."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / MANIFEST).exists() or (path / "model.safetensors").exists():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/step_*/)")
    return ckpts[-1]


QUICK_HASH_BYTES = 16 << 20  # newest_valid_checkpoint(deep=False) hashes files up to this size


def newest_valid_checkpoint(run_dir: str | Path, deep: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run folder that matches its manifest, or None; and the newer ones
    skipped, each with the reason. What `--resume auto` continues from: a torn or corrupt newest
    checkpoint falls back to the one before. `deep`: every file hashed (SHA-256), what the process
    that claims the run folder does once per start; else every file's size, and the hash of those
    up to QUICK_HASH_BYTES (state, index, optimizer scalars, tokenizer): what each rank does, so that
    N ranks do not each hash every shard of a large checkpoint (a rank hashes the shards it reads
    anyway, ltk/training/sharded_checkpoint.py). A file that vanishes while it is read (set aside by
    another process) counts as damaged."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            files = read_manifest(path)
            for name, meta in files.items():
                if deep or meta["bytes"] <= QUICK_HASH_BYTES:
                    verify_file(path, name, meta)
                elif (path / name).stat().st_size != meta["bytes"]:
                    raise CheckpointError(f"{path / name} is {(path / name).stat().st_size} bytes, its manifest "
                                          f"says {meta['bytes']}: the checkpoint is truncated")
            return path, skipped
        except (CheckpointError, OSError) as e:
            skipped.append((path, str(e)))
        except (KeyError, TypeError) as e:  # an entry of the manifest without its sha256 or bytes
            skipped.append((path, f"{path / MANIFEST} is malformed ({e!r})"))
    return None, skipped


def read_manifest(path: Path) -> dict[str, dict]:
    """The manifest's files {name: {sha256, bytes}}; a checkpoint without one did not finish saving."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: the save did not finish; refusing to load it")
    try:
        return read_json(manifest_path)["files"]
    except BadFileError as e:
        raise CheckpointError(f"{e}; refusing to load {path}") from None
    except KeyError:
        raise CheckpointError(f"{manifest_path} lists no files; refusing to load {path}") from None


def verify_file(path: Path, name: str, meta: dict) -> None:
    """One file of a checkpoint against its manifest entry: an error naming the file if it differs."""
    f = path / name
    if not f.exists():
        raise CheckpointError(f"checkpoint {path} is missing {name}")
    if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
        earlier = [p for p in list_checkpoints(path.parent.parent) if p != path]
        hint = f"; the previous checkpoint is {earlier[-1]}" if earlier else ""
        raise CheckpointError(
            f"checksum mismatch in {f}: the checkpoint is corrupt or truncated; refusing to load it{hint}"
        )


def verify_checkpoint(path: Path, only: set[str] | None = None) -> dict[str, dict]:
    """Every file of the manifest (or those in `only`) verified; returns the manifest's files."""
    files = read_manifest(path)
    for name, meta in files.items():
        if only is None or name in only:
            verify_file(path, name, meta)
    return files


def is_sharded(path: Path) -> bool:
    from ltk.training.sharded_checkpoint import INDEX

    return (path / INDEX).exists()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint folder (or the newest one of a run folder). A sharded one:
    its small files now; each shard is verified when it is first read."""
    path = resolve_checkpoint(path)
    if is_sharded(path):
        from ltk.training.sharded_checkpoint import INDEX

        verify_checkpoint(path, only={INDEX, "trainer.pt", "state.json"})
        return Checkpoint(path=path, state=read_json(path / "state.json"), sharded=True)
    verify_checkpoint(path)
    model = load_safetensors(path / "model.safetensors")
    trainer = load_tensors_only(path / "trainer.pt")
    state = read_json(path / "state.json")
    return Checkpoint(path=path, model=model, trainer=trainer, state=state)


def full_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The single-process state dict (tied weights under their first name) of a checkpoint of either
    form, or of a run folder's newest: for single-process consumers (generate, finetune, tests)."""
    path = resolve_checkpoint(path)
    if not is_sharded(path):
        verify_checkpoint(path, only={"model.safetensors"})
        return load_safetensors(path / "model.safetensors")
    from ltk.training.sharded_checkpoint import open_reader

    with open_reader(path) as reader:
        return {name: reader.read(name) for name in reader.names()}


def read_state(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint's folder (or a run folder's newest) and its state.json, without reading the
    weights: what a launcher needs to check a resume before it starts any process."""
    path = resolve_checkpoint(path)
    try:
        return path, read_json(path / "state.json")  # bad JSON: the file, line and column
    except OSError as e:
        raise CheckpointError(f"{path / 'state.json'} is unreadable ({e}); refusing to resume from {path}") from None


def restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load saved weights into `model`, strictly: a missing or unexpected tensor, or a shape
    mismatch, is an error that names it. Tied weights (saved once) are re-tied by the
    module itself, so only their aliases may be absent."""
    own = model.state_dict()
    ptr_names: dict[int, list[str]] = {}
    for name, t in own.items():
        ptr_names.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    aliases = {n for names in ptr_names.values() for n in names[1:]}
    missing = [n for n in own if n not in tensors and n not in aliases]
    unexpected = [n for n in tensors if n not in own]
    mismatched = [f"{n}: saved {tuple(tensors[n].shape)}, model {tuple(own[n].shape)}"
                  for n in tensors if n in own and tensors[n].shape != own[n].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {mismatched}"
        )
    model.load_state_dict({**{n: own[n] for n in aliases}, **tensors}, strict=True)
