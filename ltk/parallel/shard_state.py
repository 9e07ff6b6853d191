"""What one rank holds of the model and optimizer state, as boxes of the single-process tensors,
for sharded checkpoints (ltk/training/sharded_checkpoint.py writes and reads them).

A box is an N-D block of a global tensor: `offsets` where it starts, `sizes` its extent (the
idea of torch.distributed.checkpoint's ChunkStorageMetadata). Each rank lists the boxes it
holds, with a view of its own memory for each, whatever the engine:

    one process, ddp, naive-ddp, torch-ddp   every parameter whole: one box = the tensor
    tensor parallel (tp_plan.py)             column-parallel: rows [r·k, (r+1)·k) of each
                                             segment (fused qkv: 3 boxes); vocab-parallel and
                                             the padded head: rows [start, start + n_valid),
                                             the padding rows in no box; row-parallel: columns
                                             [r·k, (r+1)·k); everything else replicated
    ZeRO-1/2/3 (zero.py, zero3.py)           the flat range [lo, hi) of the buffer, cut per
                                             parameter, then into boxes (`range_boxes`)
    DeepSpeed (deepspeed_engine.py)          a snapshot: every parameter whole in fp32, read
                                             through DeepSpeed's fragment API; dp rank 0 writes
    ZeRO over tensor parallelism             the flat range of the TP-local tensor, boxes
                                             intersected with the TP boxes
    fsdp2, torch-tp, fsdp2 x tp (fsdp2.py)   each DTensor parameter: its local shard, the box
                                             DTensor places at (local shape, global offset);
                                             holder = the parameter, view = its to_local();
                                             AdamW's moments are DTensors placed alike; GPT's
                                             head-major qkv rows mapped back to single-process
                                             rows (torch_tp.single_rows); a placement Replicate
                                             on a mesh dim is written where that coordinate is 0
    pipeline (pipeline_run.py)               each stage's parameters whole; GPT's tied copy
                                             of wte on the last stage held, never written
    pipeline x fsdp2 (torch_pp_fsdp.py)      each stage's DTensor shards, as fsdp2's, under
                                             the single-process names; the tied copy likewise
                                             held, never written
    mixed precision (mixed.py)               the replicated engines' boxes are held by the
                                             fp32 master (what the optimizer updates and is
                                             keyed by); the bf16 parameter is a copy filled
                                             from it on load (`full_copies`)

A flat range [a, b) of a row-major tensor of shape (d_0, ..., d_k) is a union of at most 2k+1
boxes, each contiguous in memory: a partial row, full rows, a partial row, recursively,

    [a, b) of (4, 5) with a = 3, b = 17:   row 0 cols 3-4 | rows 1-2 | row 3 cols 0-1

so a box is `flat[start:start + numel].view(sizes)`. A replicated box is written by one rank
only (data-parallel rank 0 of replicating engines, tensor-parallel rank 0 of replicated
parameters): `Box.write`. Every rank loads every box it holds.

Only the data structures named in the brief are read: FlatShard (.layout, .master, .pieces),
the engines' `buffers`/`units` and the optimizer's state; never `p.data` of a ZeRO-3 parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ltk.parallel.zero import ShardedEngine

Slices = tuple[slice, ...]


@dataclass
class Box:
    """One box of the global tensor `name` held by this rank."""
    name: str
    shape: tuple[int, ...]  # the global (single-process) tensor's shape
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    holder: torch.Tensor  # the optimizer's parameter tensor that holds it (its state is shaped alike)
    index: Any  # how to cut the box out of a tensor shaped like holder: holder_like[index] -> (sizes)
    write: bool = True
    copies: list = field(default_factory=list)  # (tensor, index) other tensors holding the same values

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):  # the holder's local shard: what this rank's memory holds
            t = t.to_local()
        flat, inner = self.index
        v = t.reshape(-1)[flat[0]:flat[1]].view(flat[2]) if flat is not None else t
        return v[inner]


def range_boxes(shape: tuple[int, ...], a: int, b: int) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """The flat range [a, b) of a row-major tensor of `shape` as contiguous boxes:
    [(flat start, offsets, sizes)], in order."""
    if a >= b:
        return []
    if not shape:
        return [(0, (), ())]
    inner = math.prod(shape[1:])
    if a % inner == 0 and b % inner == 0:  # whole rows of dim 0
        return [(a, (a // inner,) + (0,) * (len(shape) - 1), (b // inner - a // inner,) + tuple(shape[1:]))]
    out = []
    row = a // inner
    if a % inner:  # a partial row first
        end = min(b, (row + 1) * inner)
        sub = range_boxes(shape[1:], a % inner, end - row * inner)
        out += [(row * inner + s, (row,) + o, (1,) + z) for s, o, z in sub]
        a = end
    if a < b:
        whole = (b // inner) * inner
        if whole > a:
            out += range_boxes(shape, a, whole)
            a = whole
        if a < b:  # a partial row last
            row = a // inner
            out += [(row * inner + s, (row,) + o, (1,) + z) for s, o, z in range_boxes(shape[1:], 0, b - a)]
    return out


def intersect(o1, s1, o2, s2) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The intersection of two boxes (offsets, sizes), or None."""
    lo = tuple(max(a, b) for a, b in zip(o1, o2))
    hi = tuple(min(a + m, b + n) for a, m, b, n in zip(o1, s1, o2, s2))
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return None
    return lo, tuple(h - lo_ for lo_, h in zip(lo, hi))


def _slices(offsets, sizes) -> Slices:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


# -- tensor parallelism: local tensor -> global boxes ----------------------------------------
def tp_boxes(model: nn.Module) -> dict[int, tuple[tuple[int, ...], list, bool]]:
    """id(param) -> (global shape, [(local offsets, global offsets, sizes)], split) for every
    parameter of a tensor-parallel model (replicated ones: the whole tensor, split False)."""
    from ltk.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    out: dict[int, tuple] = {}
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            n, r = mod.comm.size, mod.comm.rank
            segs = getattr(mod, "segments", (None,))
            glob = mod.out_features if isinstance(mod, ColumnParallelLinear) else mod.num_embeddings
            for attr in ("weight", "bias"):
                p = getattr(mod, attr, None)
                if p is None or id(p) in out:
                    continue
                rest = tuple(p.shape[1:])
                zeros = (0,) * len(rest)
                if len(segs) == 1:  # one block of rows: [start, start + n_valid); padding rows in no box
                    boxes = [((0,) + zeros, (mod.vocab_start,) + zeros, (mod.n_valid,) + rest)]
                else:  # rank r holds piece r of every segment, concatenated
                    boxes, local = [], 0
                    for i, s in enumerate(segs):
                        k = s // n
                        boxes.append(((local,) + zeros, (sum(segs[:i]) + r * k,) + zeros, (k,) + rest))
                        local += k
                out[id(p)] = ((glob,) + rest, boxes, True)
        elif isinstance(mod, RowParallelLinear):
            w, r = mod.weight, mod.comm.rank
            k = w.shape[1]
            out[id(w)] = ((w.shape[0], mod.in_features), [((0, 0), (0, r * k), tuple(w.shape))], True)
    return out


def _whole(p: torch.Tensor) -> tuple[tuple[int, ...], list, bool]:
    shape = tuple(p.shape)
    return shape, [((0,) * len(shape), (0,) * len(shape), shape)], False


def _placement(model: nn.Module | None) -> tuple[dict, int]:
    """(tp_boxes of the model or {}, this rank's tensor-parallel rank)."""
    comm = getattr(model, "tp_comm", None)
    if comm is None:
        return {}, 0
    return tp_boxes(model), comm.rank


def _param_boxes(name, p, holder, place, tp_rank, write_dp: bool, flat=None) -> list[Box]:
    """Boxes of parameter p (TP-local tensor) held in `holder`. flat = (start in holder, local
    flat range [a, b) of p): the holder keeps p's elements a..b flattened (a ZeRO shard)."""
    shape, tboxes, split = place.get(id(p), None) or _whole(p)
    write = write_dp and (split or tp_rank == 0)
    local_shape = tuple(p.shape)  # metadata only: never p.data (ZeRO-3 may leave it unallocated)
    if flat is None:
        contig = [(None, (0,) * len(local_shape), local_shape)]
    else:
        start, a, b = flat
        contig = [((start + s - a, start + s - a + math.prod(z), z), o, z)
                  for s, o, z in range_boxes(local_shape, a, b)]
    out = []
    for cut, c_off, c_size in contig:
        for l_off, g_off, size in tboxes:
            hit = intersect(c_off, c_size, l_off, size)
            if hit is None:
                continue
            i_off, i_size = hit
            inner = _slices([x - y for x, y in zip(i_off, c_off)], i_size)
            glob = tuple(x - y + g for x, y, g in zip(i_off, l_off, g_off))
            out.append(Box(name, shape, glob, i_size, holder, (cut, inner), write))
    return out


# -- per engine ----------------------------------------------------------------------------------
def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _masters(optimizer) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master under mixed precision (MasterOptimizer), else empty."""
    return getattr(optimizer, "master_of", {})


def saved_names(run) -> set[str] | None:
    """The parameters a checkpoint of `run` holds: None = every one; fine-tuning with an adapter
    names the trainable ones (ltk/training/adapters.py: the frozen base is referenced, not copied)."""
    return getattr(run, "checkpoint_names", None)


def local_boxes(run) -> list[Box]:
    """Every box this rank holds (ParallelRun or PipelineRun) of the parameters its checkpoints
    hold (`saved_names`), in a fixed order."""
    names = saved_names(run)
    boxes = _held_boxes(run)
    return boxes if names is None else [b for b in boxes if b.name in names]


def _held_boxes(run) -> list[Box]:
    from ltk.parallel.pipeline_run import PipelineRun, _is_tied_copy

    snap = getattr(run, "snapshot", None)
    if snap is not None:  # DeepSpeed, seen through whole fp32 tensors (ltk/parallel/deepspeed_engine.py)
        return [b for n, h in zip(snap.names, snap.holders) for b in _param_boxes(n, h, h, {}, 0, run.dp_rank == 0)]
    masters = _masters(run.optimizer)
    if isinstance(run, PipelineRun):
        out = []
        if getattr(run, "dtensor", False):  # FSDP2 over dp (torch_pp_fsdp.py): each stage's DTensor shards
            run.reshard()
            for c in run.chunks:
                for b in dtensor_boxes(c, {"dp": run.dp_rank}):
                    b.write = b.write and not _is_tied_copy(c, b.name)
                    b.name = run._alias[b.name]
                    out.append(b)
            return out
        for c in run.chunks:
            for n, p in c.named_parameters():
                write = run.dp_rank == 0 and not _is_tied_copy(c, n)
                out += _param_boxes(run._alias[n], p, masters.get(id(p), p), {}, 0, write)
        return out
    model = _unwrapped(run.model)
    place, tp_rank = _placement(model)
    engine = run.engine
    if getattr(run, "dtensor", False):  # fsdp2 / torch-tp: DTensor parameters
        engine.reshard()  # the sharded parameters registered, not gathered copies
        return dtensor_boxes(model, run.mesh.coords)
    if isinstance(engine, ShardedEngine):  # ZeRO-1/2/3: FlatShards
        return _flat_boxes(engine, place, tp_rank)
    # replicas: data-parallel rank 0 writes (of its context-parallel ranks, which hold the same, the first)
    write_dp = getattr(run, "dp_rank", 0) == 0 and getattr(run, "cp_rank", 0) == 0
    return [b for n, p in model.named_parameters()
            for b in _param_boxes(n, p, masters.get(id(p), p), place, tp_rank, write_dp)]


def dtensor_boxes(model: nn.Module, coords: dict[str, int]) -> list[Box]:
    """The boxes of a model whose parameters are DTensors (or plain tensors, replicated): the
    local shard at its global offset, in single-process rows. Written by the rank whose
    coordinate (coords: "dp", "tp") is 0 on every mesh dim the parameter does not shard —
    dims of its mesh placed Replicate, and dims its mesh lacks (fsdp2 x tp: a norm on dp only)."""
    from ltk.parallel.fsdp2 import local_part
    from ltk.parallel.torch_tp import single_rows

    out = []
    for name, p in model.named_parameters():
        shape, offset = local_part(p)
        if math.prod(shape) == 0:  # an uneven split left this rank no rows
            continue
        sharded = set()
        if isinstance(p, DTensor):
            dims = p.device_mesh.mesh_dim_names or ()
            sharded = {d for d, pl in zip(dims, p.placements) if not pl.is_replicate()}
        write = all(c == 0 for d, c in coords.items() if d not in sharded and d in ("dp", "tp"))
        if not shape:
            out.append(Box(name, (), (), (), p, (None, ()), write))
            continue
        rest = (slice(None),) * (len(shape) - 1)
        for start, row, n in single_rows(model, name, offset[0], offset[0] + shape[0]):
            out.append(Box(name, tuple(p.shape), (row,) + offset[1:], (n,) + shape[1:], p,
                           (None, (slice(start, start + n),) + rest), write))
    return out


def _flat_boxes(engine, place, tp_rank) -> list[Box]:
    """ZeRO: buffer b's flat range [lo, hi) meets parameter i at [max(lo, o_i), min(hi, o_i + n_i));
    that range lies in one optimizer piece (pieces split at parameter boundaries)."""
    out = []
    for buf in engine.buffers:
        lay = buf.layout
        for name, p, o, n in zip(lay.names, lay.params, lay.offsets, lay.numels):
            s, e = max(lay.lo, o), min(lay.hi, o + n)
            if s >= e:
                continue
            for t, a, b in buf.pieces:
                if lay.lo + a <= s and e <= lay.lo + b:
                    break
            else:
                raise RuntimeError(f"{name}: elements [{s}, {e}) of its buffer lie in no optimizer piece")
            start = s - lay.lo - a  # where the range starts in the piece
            out += _param_boxes(name, p, t, place, tp_rank, True, flat=(start, s - o, e - o))
    return out


def full_copies(run) -> list[tuple[str, torch.Tensor, list]]:
    """Tensors besides the optimizer's that hold whole (TP-local) parameters and must be filled on
    load: ZeRO-1/2's compute-dtype parameters (views of its flat buffer); the bf16 parameters of
    a replicated engine under mixed precision. (name, tensor, boxes), of the saved parameters."""
    names = saved_names(run)
    copies = _full_copies(run)
    return copies if names is None else [c for c in copies if c[0] in names]


def _full_copies(run) -> list[tuple[str, torch.Tensor, list]]:
    from ltk.parallel.pipeline_run import PipelineRun

    if getattr(run, "snapshot", None) is not None:  # the snapshot's tensors are the only copies
        return []
    masters = _masters(run.optimizer)
    if isinstance(run, PipelineRun):
        return [(run._alias[n], p.data, _param_boxes(run._alias[n], p, p, {}, 0, False))
                for c in run.chunks for n, p in c.named_parameters() if id(p) in masters]
    engine = run.engine
    if masters and not isinstance(engine, ShardedEngine):
        model = _unwrapped(run.model)
        place, tp_rank = _placement(model)
        return [(n, p.data, _param_boxes(n, p, p, place, tp_rank, False))
                for n, p in model.named_parameters() if id(p) in masters]
    if not isinstance(engine, ShardedEngine) or hasattr(engine, "units"):  # ZeRO-3 holds no full copy
        return []
    model = _unwrapped(run.model)
    place, tp_rank = _placement(model)
    return [(n, p.data, _param_boxes(n, p, p, place, tp_rank, False)) for buf in engine.buffers
            for n, p in zip(buf.layout.names, buf.layout.params)]


def group_names(run) -> list[list[str]]:
    """The single-process parameter names of each optimizer param group."""
    from ltk.parallel.pipeline_run import PipelineRun

    if isinstance(run, PipelineRun):
        return [list(g) for g in run._group_names]
    snap = getattr(run, "snapshot", None)
    if snap is not None:
        names = {id(h): n for n, h in zip(snap.names, snap.holders)}
        return [[names[id(h)] for h in g["params"]] for g in snap.param_groups]
    engine = run.engine
    if hasattr(engine, "_group_names"):
        return engine._group_names()
    names = {id(p): n for n, p in _unwrapped(run.model).named_parameters()}
    names.update({id(m): names[id(p)] for p, m in getattr(engine.optimizer, "pairs", []) if id(p) in names})
    return [[names[id(p)] for p in g["params"]] for g in engine.optimizer.param_groups]


def is_elementwise(v: Any, holder: torch.Tensor) -> bool:
    """Optimizer state shaped like its parameter (Adam's exp_avg, exp_avg_sq), not a step counter."""
    return torch.is_tensor(v) and v.dim() > 0 and v.shape == holder.shape
