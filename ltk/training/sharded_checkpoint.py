"""Sharded checkpoints: every rank writes what it holds, no rank ever gathers the model.

The idea of torch.distributed.checkpoint (DCP), in our own files: each tensor of the
single-process model has a global shape, and each rank saves the boxes of it that it holds
(offsets + sizes, ltk/parallel/shard_state.py); a reader assembles any box from the chunks
that intersect it, so a checkpoint written by one layout loads into any other.

    step_000200/
        rank_00000.safetensors   this rank's chunks: "{name}/{kind}/{i}" -> the box's values
        rank_00001.safetensors   kind = "param" (the fp32 master weights) or an elementwise
        ...                      optimizer state (exp_avg, exp_avg_sq)
        index.json               {"tensors": {name: {"shape": [...], "kinds": {kind:
                                     {"dtype", "chunks": [{"file", "key", "offsets", "sizes"}]}}}}}
        trainer.pt               0-d optimizer state (step) and param-group hyper-parameters, both
                                 by parameter name; RNG states, the loss scaler
        state.json, tokenizer.json, manifest.json   as the consolidated form (checkpoint.py)

    global (8, 6) tensor, ZeRO over 3 ranks, flat shards of 16:
        rank 0: rows 0-1 + row 2 cols 0-3    rank 1: row 2 cols 4-5 + rows 3-4 + row 5 cols 0-1
        rank 2: row 5 cols 2-5 + rows 6-7    = 2 + 3 + 2 chunks, each a box

Guarantees kept from the consolidated form: atomic (rank 0 makes one hidden .tmp folder, every
rank writes its file into it, rank 0 renames it once all have reported: an interrupted save
leaves the previous checkpoint loadable), checksummed (each rank hashes its own file; the
manifest lists every file; a reader verifies each file before its first read and refuses a
damaged one by name), keep_last, exact resume. A replicated box is written once (shard_state's
Box.write). Only metadata travels between ranks (gather_object of chunk lists and hashes),
never a tensor. The ranks must see one file system: on several nodes, a shared one.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from ltk.models.files import BadFileError, load_tensors_only, read_json
from ltk.parallel.shard_state import group_names, intersect, is_elementwise, local_boxes
from ltk.training.checkpoint import CheckpointError, _sha256, new_tmp_dir, publish, read_manifest, verify_file
from ltk.training.safetensors_stream import write_streamed

INDEX = "index.json"
FORMAT = "ltk-sharded-1"


# -- writing ---------------------------------------------------------------------------------------
def _write_rank(run, tmp: Path, rank: int) -> dict[str, Any]:
    """This rank's file of written boxes; returns its metadata (chunks, hash, 0-d optimizer state)."""
    opt = run.optimizer
    entries, chunks, scalars, count = [], [], {}, {}
    for b in local_boxes(run):
        if not b.write:
            continue
        st = opt.state.get(b.holder, {})
        kinds = [("param", b.holder)] + [(k, v) for k, v in sorted(st.items()) if is_elementwise(v, b.holder)]
        for kind, src in kinds:
            i = count[(b.name, kind)] = count.get((b.name, kind), -1) + 1
            key, view = f"{b.name}/{kind}/{i}", b.view(src)
            entries.append((key, view.dtype, b.sizes, lambda v=view: v))
            chunks.append({"name": b.name, "shape": list(b.shape), "kind": kind, "dtype": str(view.dtype)[6:],
                           "key": key, "offsets": list(b.offsets), "sizes": list(b.sizes)})
        scalars.setdefault(b.name, {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                    for k, v in st.items() if not is_elementwise(v, b.holder)})
    name = f"rank_{rank:05d}.safetensors"
    size = write_streamed(tmp / name, entries)
    return {"file": name, "hash": {"sha256": _sha256(tmp / name), "bytes": size}, "chunks": chunks,
            "scalars": scalars}


def _index(metas: list[dict], world: int, layout: dict) -> dict:
    tensors: dict[str, dict] = {}
    for m in metas:
        for c in m["chunks"]:
            t = tensors.setdefault(c["name"], {"shape": c["shape"], "kinds": {}})
            k = t["kinds"].setdefault(c["kind"], {"dtype": c["dtype"], "chunks": []})
            k["chunks"].append({"file": m["file"], "key": c["key"], "offsets": c["offsets"], "sizes": c["sizes"]})
    for name, t in tensors.items():  # every element written exactly once (boxes never overlap)
        got = sum(math.prod(c["sizes"]) for c in t["kinds"]["param"]["chunks"])
        if got != math.prod(t["shape"]):
            raise CheckpointError(f"{name}: the ranks wrote {got} of its {math.prod(t['shape'])} elements")
    return {"format": FORMAT, "world_size": world, "layout": layout, "tensors": tensors}


def _layout(run) -> dict:
    mesh = run.mesh
    return {"strategy": getattr(run, "strategy", "pipeline"), "dp": mesh.dp, "tp": mesh.tp, "pp": mesh.pp,
            "cp": mesh.cp}


def save_sharded(run, run_dir: str | Path, step: int, trainer_state: dict[str, Any], state: dict[str, Any], *,
                 keep_last: int = 3, extra_files: dict[str, str | Path] | None = None) -> Path | None:
    """Collective: every rank of `run` (a ParallelRun or PipelineRun) writes its boxes; rank 0 writes
    the index, trainer.pt (trainer_state + 0-d optimizer state and param groups by name),
    state.json and the manifest, and renames the folder into place. Returns its path on rank 0,
    None elsewhere; a failure on any rank raises CheckpointError on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run = run.checkpoint_view() if hasattr(run, "checkpoint_view") else run  # DeepSpeed: a snapshot (collective)
    box: list[Any] = [None]
    if rank == 0:
        box = [str(new_tmp_dir(run_dir, step))]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        meta = _write_rank(run, tmp, rank)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which removes the folder; every rank raises
        meta = {"error": f"rank {rank}: {type(e).__name__}: {e}"}
    metas: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(meta, metas, dst=0)
    result: list[Any] = [None]
    if rank == 0:
        try:
            errors = [m["error"] for m in metas if "error" in m]
            if errors:
                raise CheckpointError("; ".join(errors))
            result = [("ok", str(_finish(run, tmp, run_dir, step, metas, world, trainer_state, state,
                                         keep_last, extra_files)))]
        except Exception as e:  # noqa: BLE001 - every rank raises it below
            shutil.rmtree(tmp, ignore_errors=True)
            result = [("error", f"saving checkpoint step {step} failed: {e}")]
    dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise CheckpointError(value)
    return Path(value) if rank == 0 else None


def _finish(run, tmp, run_dir, step, metas, world, trainer_state, state, keep_last, extra_files) -> Path:
    (tmp / INDEX).write_text(json.dumps(_index(metas, world, _layout(run))))
    scalars: dict[str, dict] = {}
    for m in metas:
        for name, st in m["scalars"].items():
            scalars.setdefault(name, st)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
              for g, names in zip(run.optimizer.param_groups, group_names(run))]
    order = [n for names in group_names(run) for n in names if scalars.get(n)]
    trainer = {**trainer_state, "optimizer": {"state": {n: scalars[n] for n in order}, "param_groups": groups}}
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    hashed = {m["file"]: m["hash"] for m in metas}
    return publish(tmp, run_dir, step, [INDEX, "trainer.pt", "state.json"], extra_files, hashed,
                   keep_last=keep_last, fmt=2)


# -- reading ---------------------------------------------------------------------------------------
class ShardedReader:
    """Any box of any tensor of a sharded checkpoint, read from the chunks that meet it
    (safetensors get_slice: only those bytes). Each file is verified before its first read."""

    by_position = False

    def __init__(self, path: Path):
        self.path = path
        self.files = read_manifest(path)
        for small in (INDEX, "trainer.pt"):
            verify_file(path, small, self.files.get(small, {"bytes": -1}))
        self.index = read_json(path / INDEX)
        if self.index.get("format") != FORMAT:
            raise CheckpointError(f"{path / INDEX}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.tensors = self.index["tensors"]
        self.trainer = load_tensors_only(path / "trainer.pt")
        self._open: dict[str, Any] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._open.clear()

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def kinds(self, name: str) -> list[str]:
        return list(self.tensors[name]["kinds"])

    def scalars(self, name: str) -> dict[str, Any]:
        return self.trainer["optimizer"]["state"].get(name, {})

    @property
    def param_groups(self) -> list[dict]:
        return self.trainer["optimizer"]["param_groups"]

    def _file(self, name: str):
        if name not in self._open:
            if name not in self.files:
                raise CheckpointError(f"{self.path / INDEX} names {name}, which the manifest does not list")
            verify_file(self.path, name, self.files[name])
            try:
                self._open[name] = safe_open(str(self.path / name), framework="pt")
            except SafetensorError as e:
                raise BadFileError(f"{self.path / name} is truncated or corrupt: {e}") from None
        return self._open[name]

    def read(self, name: str, kind: str = "param", offsets=None, sizes=None) -> torch.Tensor:
        """The box (offsets, sizes) of tensor `name` (default: all of it), in its saved dtype."""
        meta = self.tensors[name]["kinds"][kind]
        shape = self.shape(name)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else shape
        out = torch.empty(sizes, dtype=getattr(torch, meta["dtype"]))
        covered = 0
        for c in meta["chunks"]:
            hit = intersect(offsets, sizes, c["offsets"], c["sizes"])
            if hit is None:
                continue
            lo, size = hit
            src = tuple(slice(a - b, a - b + s) for a, b, s in zip(lo, c["offsets"], size))
            dst = tuple(slice(a - b, a - b + s) for a, b, s in zip(lo, offsets, size))
            sl = self._file(c["file"]).get_slice(c["key"])
            out[dst] = sl[src] if src else sl[:]
            covered += math.prod(size)
        if covered != math.prod(sizes):
            raise CheckpointError(f"{self.path}: the chunks of {name} ({kind}) cover {covered} of the "
                                  f"{math.prod(sizes)} elements of box {offsets} + {sizes}")
        return out


class ConsolidatedReader:
    """The same interface over a single-process checkpoint (model.safetensors; the optimizer state by
    parameter name in trainer.pt, memory-mapped so a box reads only its bytes)."""

    def __init__(self, path: Path):
        self.path = path
        files = read_manifest(path)
        for name in ("model.safetensors", "trainer.pt"):
            verify_file(path, name, files.get(name, {"bytes": -1}))
        try:
            self._model = safe_open(str(path / "model.safetensors"), framework="pt")
        except SafetensorError as e:
            raise BadFileError(f"{path / 'model.safetensors'} is truncated or corrupt: {e}") from None
        self.trainer = load_tensors_only(path / "trainer.pt", mmap=True)
        opt = self.trainer.get("optimizer", {})
        self._state = opt.get("state", {})
        self.by_position = not all(isinstance(k, str) for k in self._state)  # before states were saved by name
        self.param_groups = opt.get("param_groups", [])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._model = None

    def names(self) -> list[str]:
        return list(self._model.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._model.get_slice(name).get_shape())

    def kinds(self, name: str) -> list[str]:
        st = {} if self.by_position else self._state.get(name, {})
        return ["param"] + [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0]

    def scalars(self, name: str) -> dict[str, Any]:
        st = {} if self.by_position else self._state.get(name, {})
        return {k: v for k, v in st.items() if not (torch.is_tensor(v) and v.dim() > 0)}

    def read(self, name: str, kind: str = "param", offsets=None, sizes=None) -> torch.Tensor:
        shape = self.shape(name)
        offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
        sizes = tuple(sizes) if sizes is not None else shape
        box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        if kind == "param":
            sl = self._model.get_slice(name)
            return sl[box] if box else sl[:]
        return self._state[name][kind][box].clone()


def open_reader(path: Path) -> ShardedReader | ConsolidatedReader:
    """A reader of checkpoint folder `path`, whichever form it has."""
    return ShardedReader(path) if (path / INDEX).exists() else ConsolidatedReader(path)


def consolidated_trainer_state(path: Path) -> dict[str, Any]:
    """trainer.pt as a single-process run writes it (optimizer state by name, full size): for
    single-process consumers and tests of a sharded checkpoint."""
    with open_reader(path) as r:
        state = {n: {**r.scalars(n), **{k: r.read(n, k) for k in r.kinds(n) if k != "param"}} for n in r.names()}
        opt = {"state": {n: st for n, st in state.items() if st}, "param_groups": r.param_groups}
        return {**{k: v for k, v in r.trainer.items() if k != "optimizer"}, "optimizer": opt}
