"""Load a checkpoint into whatever this rank holds: resharding on load.

`load_local_state(run, reader)` asks ltk/parallel/shard_state.py for the boxes this rank holds
(its layout: world size, engine, tensor and pipeline degrees), and reads each box from the
checkpoint (ltk/training/sharded_checkpoint.py's readers: a sharded checkpoint of any layout, or a
consolidated single-process one). It reads only those boxes, never the whole state:

    1. holders zeroed (the fp32 masters / parameters the optimizer updates); the optimizer state
       rebuilt for each: 0-d entries (step) from the checkpoint, elementwise ones (exp_avg,
       exp_avg_sq) zeros of the holder's shape — so padding (the flat tail of a ZeRO buffer,
       the vocabulary padding rows of tensor parallelism) is zero, as at initialization
    2. every box: param -> holder[box]; each elementwise state -> state[box]
    3. compute-dtype copies: ZeRO-1/2's full parameters (read whole: ZeRO-1/2 holds them
       whole anyway), ZeRO-3's compute shard = its master shard
    4. param-group hyper-parameters by parameter name (the run's own fused/foreach flags kept)

No communication: every rank reads its own boxes, so ranks holding the same box (replicas)
end up equal because they read the same bytes.
"""
from __future__ import annotations

from typing import Any

import torch

from ltk.parallel.shard_state import _unwrapped, full_copies, group_names, local_boxes, saved_names
from ltk.training.checkpoint import CheckpointError

_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # how this run's optimizer computes


def model_names(run) -> list[str]:
    """The single-process names of every parameter of the whole model (every rank knows them all)
    that a checkpoint of `run` holds (with an adapter: the trainable ones, shard_state.saved_names)."""
    from ltk.parallel.pipeline_run import PipelineRun

    if isinstance(run, PipelineRun):
        return list(dict.fromkeys(run._alias.values()))
    names = saved_names(run)
    return [n for n, _ in _unwrapped(run.model).named_parameters() if names is None or n in names]


def _check_names(run, reader) -> None:
    ours, saved = model_names(run), set(reader.names())
    missing = [n for n in ours if n not in saved]
    unexpected = sorted(saved - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {reader.path} does not fit the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")


def _step_value(v: Any, holder: torch.Tensor, group: dict) -> Any:
    """A 0-d state entry placed as torch's Optimizer.load_state_dict places it."""
    if not torch.is_tensor(v):
        return v
    if group.get("fused") or group.get("capturable"):
        return v.to(device=holder.device, dtype=torch.float32).clone()
    return v.clone()


@torch.no_grad()
def load_local_state(run, reader, *, optimizer: bool = True) -> None:
    """Fill this rank's parameters (and, with `optimizer`, its optimizer state and param groups)
    from `reader`, whatever layout wrote it (see the module docstring). An engine that keeps its
    state in its own structures (DeepSpeed) is loaded through a snapshot, then given it back."""
    view = run.checkpoint_view() if hasattr(run, "checkpoint_view") else run
    if view is not run:
        _load_into(view, reader, optimizer)
        view.restore()
        return
    _load_into(run, reader, optimizer)


def _load_into(run, reader, optimizer: bool) -> None:
    _check_names(run, reader)
    engine = getattr(run, "engine", None)
    if hasattr(engine, "wait_params"):  # ZeRO-1/2: an all-gather in flight would overwrite what we load
        engine.wait_params()
    boxes = local_boxes(run)
    for b in boxes:
        if reader.shape(b.name) != b.shape:
            raise CheckpointError(f"checkpoint {reader.path}: {b.name} is saved {reader.shape(b.name)}, "
                                  f"the model's is {b.shape}")
    opt = run.optimizer
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    holders: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for b in boxes:
        holders.setdefault(id(b.holder), (b.holder, []))[1].append(b.name)
    for h, names in holders.values():
        h.zero_()
        if not optimizer:
            continue
        names = list(dict.fromkeys(names))
        kinds = [[k for k in reader.kinds(n) if k != "param"] for n in names]
        if not any(kinds):  # nothing saved (a parameter that never had a gradient): a fresh state
            opt.state.pop(h, None)
            continue
        if any(k != kinds[0] for k in kinds):
            raise CheckpointError(f"checkpoint {reader.path}: optimizer states differ among {names} "
                                  f"({dict(zip(names, kinds))}), which this layout keeps in one tensor")
        scalars = next((s for s in map(reader.scalars, names) if s), {})
        state = {k: _step_value(v, h, group_of.get(id(h), {})) for k, v in scalars.items()}
        state.update({k: torch.zeros_like(h) for k in kinds[0]})
        opt.state[h] = state
    for b in boxes:
        b.view(b.holder).copy_(reader.read(b.name, "param", b.offsets, b.sizes))
        if optimizer:
            for k, v in opt.state.get(b.holder, {}).items():
                if torch.is_tensor(v) and v.dim() > 0:
                    b.view(v).copy_(reader.read(b.name, k, b.offsets, b.sizes))
    for name, t, bxs in full_copies(run):
        t.zero_()
        for b in bxs:
            b.view(t).copy_(reader.read(name, "param", b.offsets, b.sizes))
    for u in getattr(getattr(run, "engine", None), "units", []):  # ZeRO-3: compute shard <- master
        if u.shard is not u.master:
            u.shard.copy_(u.master)
    if optimizer:
        _load_groups(run, reader.param_groups)


def _load_groups(run, saved: list[dict]) -> None:
    ours, groups = group_names(run), run.optimizer.param_groups
    if len(saved) != len(ours):
        raise CheckpointError(f"the checkpoint's optimizer has {len(saved)} param groups, this run has {len(ours)}")
    for i, (g, names) in enumerate(zip(saved, ours)):
        if set(g["params"]) != set(names):
            raise CheckpointError(f"param group {i} names differ: {sorted(set(g['params']) ^ set(names))}")
        groups[i].update({k: v for k, v in g.items() if k != "params" and k not in _IMPLEMENTATION})

