"""DeepSpeed ZeRO behind `--parallel deepspeed-zero1|2|3`: the production engine the lab's own
ZeRO (ltk/parallel/zero.py, zero3.py) is measured against, driven by the same training loop.

    ltk train --preset gpt-debug --parallel deepspeed-zero3 --nproc 2      # needs: pip install deepspeed

The DeepSpeed config is generated from ours (`ds_config`), so a run differs from `--parallel
zero3` only in the engine:

    train_micro_batch_size_per_gpu   trainer.batch_size / dp (every rank trains on its block of
                                     rows of the global micro-batch, as ours do)
    gradient_accumulation_steps      1: the loop drives the accumulation itself — `no_sync` marks
                                     the micro-batches that are not the last, the engine's
                                     `set_gradient_accumulation_boundary` is told so, and the loss
                                     comes already divided by grad_accum (backward with
                                     scale_wrt_gas=False)
    zero_optimization.stage          1 | 2 | 3 (Rajbhandari et al. 2020, §5: P_os, P_os+g, P_os+g+p)
    gradient_clipping                optim.grad_clip: DeepSpeed clips inside its step with the
                                     rule torch.nn.utils.clip_grad_norm_ uses, so the norm the
                                     loop logs is read after the step (`clip_grad_norm_` returns
                                     None, `grad_norm()` the engine's)
    bf16.enabled                     --trainer.dtype bf16: bf16 parameters, fp32 master shards
    communication_data_type          --parallel.reduce_dtype fp32 (default: the gradients' dtype)
    optimizer                        none: our AdamW (ltk/training/optim.py) as DeepSpeed's
                                     client optimizer, so the update is the same and no fused
                                     Adam extension is built

Checkpoints are the lab's sharded format (ltk/training/sharded_checkpoint.py), not DeepSpeed's
own files: `snapshot()` reads every parameter's full fp32 value and Adam moments through
DeepSpeed's tensor-fragment API (deepspeed.utils.safe_get_full_*; a collective per tensor), and
`restore()` writes them back (safe_set_full_*), so a DeepSpeed run resumes at any world size,
under any engine (ours at N ranks, one process), and `ltk generate` / `ltk export --hf` read it
as they read every other run. The price: while a save or load runs, every rank holds the whole
model's fp32 weights and moments (12Ψ bytes) once; DeepSpeed's own save_checkpoint keeps only
its shard, but its files resume only under DeepSpeed at the same world size.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable

import torch
import torch.nn as nn

STAGES = {"deepspeed-zero1": 1, "deepspeed-zero2": 2, "deepspeed-zero3": 3}
INSTALL = "pip install deepspeed   (or: pip install -e '.[baselines]')"


def import_deepspeed(device_type: str = "cpu"):
    """deepspeed, with its accelerator chosen for `device_type` before the import (its CPU
    accelerator talks gloo); a clear error naming the install command when it is absent."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device_type == "cpu" else "cuda")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"--parallel deepspeed-zero*: DeepSpeed is not installed ({e}); {INSTALL}") from e
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-step INFO lines would drown the run's
    return deepspeed


def ds_config(stage: int, micro_batch: int, grad_clip: float, compute_dtype: str, reduce_dtype: str | None) -> dict:
    """The DeepSpeed config equivalent to our run's settings (module docstring)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # a torch AdamW as the client optimizer
        "gradient_clipping": grad_clip if math.isfinite(grad_clip) and grad_clip > 0 else 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if compute_dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if reduce_dtype not in (None, compute_dtype):
        cfg["communication_data_type"] = reduce_dtype
    return cfg


class _Snapshot:
    """What a checkpoint reads and writes of a DeepSpeed run, as a plain optimizer would hold
    it: one fp32 tensor per parameter (`holders`), its Adam state in `state`, and
    `param_groups` over the holders (the torch.optim.Optimizer surface shard_state needs)."""

    def __init__(self, names: list[str], holders: list[torch.Tensor], groups: list[dict], state: dict):
        self.names, self.holders, self.param_groups, self.state = names, holders, groups, state


class DeepSpeedZero:
    """The DeepSpeed engine behind the interface of ltk/parallel/dp_engines.py's engines."""

    def __init__(self, model: nn.Module, param_groups: list[dict], optimizer_factory: Callable, *, stage: int,
                 micro_batch: int, grad_clip: float, compute_dtype: str = "fp32", reduce_dtype: str | None = None,
                 device: torch.device | None = None):
        device = device or torch.device("cpu")
        deepspeed = import_deepspeed(device.type)
        from deepspeed.utils import safe_get_full_fp32_param  # noqa: F401 - fail here, not at the first save

        self.stage, self.module = stage, model
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.order = [n for n, _ in model.named_parameters()]
        self._built_groups = [dict(g) for g in param_groups]  # over the model's parameters
        client = optimizer_factory(param_groups)  # our AdamW over the fp32 parameters
        config = ds_config(stage, micro_batch, grad_clip, compute_dtype, reduce_dtype)
        self.ds, self.optimizer, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
        self.inner = client  # DeepSpeed's optimizer steps this one on its flat fp32 partitions
        self._boundary = True

    # -- the step --------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """A micro-batch that is not the last of the step: DeepSpeed accumulates its gradients
        without finishing their reduction (stage 2/3 still reduce-scatter each micro-batch's
        gradients into the partitions, as DeepSpeed always does)."""
        self._boundary = False
        try:
            yield
        finally:
            self._boundary = True

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.set_gradient_accumulation_boundary(self._boundary)
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop divided by grad_accum already

    def clip_grad_norm_(self, max_norm: float) -> None:
        """DeepSpeed clips inside step (config gradient_clipping): the norm is known after it."""
        return None

    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self) -> None:
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()  # the optimizer step, then DeepSpeed zeroes the gradients

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def wait_params(self) -> None:
        """Nothing in flight between steps (ZeRO-3 gathers inside forward through its hooks)."""

    # -- state, whole tensors through the fragment API ---------------------------------------
    def snapshot(self) -> _Snapshot:
        """Collective: every parameter's full fp32 value and Adam moments, on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._relink()
        steps = [s["step"] for s in self.inner.state.values() if "step" in s]
        step = steps[0].clone() if steps else None
        holders, state, by_name = [], {}, {}
        for n, p in self.module.named_parameters():
            h = safe_get_full_fp32_param(p).detach().clone().float().cpu()
            st = {}
            if step is not None:
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = safe_get_full_optimizer_state(p, key).detach().clone().float().cpu()
                st["step"] = step.clone()
                state[h] = st
            holders.append(h)
            by_name[n] = h
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [by_name[self.names[id(p)]] for p in g["params"]]}
                  for g in self._client_groups()]
        return _Snapshot(list(by_name), holders, groups, state)

    def _client_groups(self) -> list[dict]:
        """The param groups as built (model parameters), with the inner optimizer's current
        hyper-parameters (DeepSpeed's inner groups hold its flat partitions instead)."""
        return [{**{k: v for k, v in inner.items() if k != "params"}, "params": g["params"]}
                for g, inner in zip(self._built_groups, self.inner.param_groups)]

    def _ensure_state(self) -> None:
        """A fresh engine has no Adam state yet (torch creates it at the first step) and so no
        fragment of it to write into: make zero moments and a zero step on every flat
        partition, then let DeepSpeed link its per-parameter fragments to them (stage 1/2)."""
        # stage 3 swaps its sub-groups' flat partitions into the inner groups at each step
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None) \
            or [flat for g in self.inner.param_groups for flat in g["params"]]
        for flat in flats:
            st = self.inner.state[flat]  # (a defaultdict) stage 3 may hold an entry without moments
            st.setdefault("step", torch.zeros((), dtype=torch.float32))
            for key in ("exp_avg", "exp_avg_sq"):
                st.setdefault(key, torch.zeros_like(flat))
        self._relink()

    def _relink(self) -> None:
        """Stage 1/2: point every parameter's fragment at the current Adam state. DeepSpeed links
        them once, at its first step, and a param group whose partition had no state yet then
        keeps an empty link; linking again is cheap (views, no copies)."""
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    @torch.no_grad()
    def restore(self, snap: _Snapshot) -> None:
        """Collective: write a snapshot's weights and moments into DeepSpeed's partitions, then
        into the copies the forward reads (stage 1/2: the model's full parameters; stage 3: its
        compute partitions), which DeepSpeed would refresh only after its next step."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        steps = [st["step"] for st in snap.state.values() if "step" in st]
        if steps:
            self._ensure_state()
        by_name = dict(zip(snap.names, snap.holders))
        for n, p in self.module.named_parameters():
            h = by_name[n]
            safe_set_full_fp32_param(p, h.to(p.device))
            if self.stage < 3:
                p.data.copy_(h.to(p.dtype))
            st = snap.state.get(h)
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, st[key].to(p.device), key)
        for s in self.inner.state.values():  # one counter per flat partition, the same for all
            if steps and torch.is_tensor(s.get("step")):
                s["step"].copy_(steps[0])
        if self.stage == 3:
            for lp, hp in zip(self.optimizer.fp16_partitioned_groups_flat, self.optimizer.fp32_partitioned_groups_flat):
                lp.data.copy_(hp.data)
        for g, saved in zip(self.inner.param_groups, snap.param_groups):
            g.update({k: v for k, v in saved.items() if k not in ("params", "fused", "foreach", "capturable")})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every parameter's full fp32 value by name."""
        snap = self.snapshot()
        return dict(zip(snap.names, snap.holders))

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Collective: the single-process optimizer state by parameter name."""
        snap = self.snapshot()
        names = {id(h): n for n, h in zip(snap.names, snap.holders)}
        return {"state": {names[id(h)]: st for h, st in snap.state.items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [names[id(h)] for h in g["params"]]} for g in snap.param_groups]}

    def load_optimizer_state_dict(self, sd: dict[str, Any]) -> None:
        """Collective: the inverse of optimizer_state_dict (the weights kept as they are)."""
        snap = self.snapshot()
        by_name = dict(zip(snap.names, snap.holders))
        snap.state = {by_name[n]: dict(st) for n, st in sd["state"].items()}
        for g, saved in zip(snap.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.restore(snap)

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes by kind (ltk/training/memory.py): the model's parameters as they are
        held (stage 3: its partitions, `ds_tensor`, plus the parameters it keeps whole), the
        gradient partitions and buckets DeepSpeed allocates, and the optimizer's flat fp32
        partitions (a copy of the weights in fp32 runs too) and Adam moments; each storage once."""
        seen: set[int] = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if not torch.is_tensor(t) or t.numel() == 0:
                    continue
                s = t.untyped_storage()
                if s.data_ptr() in seen:
                    continue
                seen.add(s.data_ptr())
                total += s.nbytes()
            return total

        params = size(t for p in self.module.parameters() for t in (p.data, getattr(p, "ds_tensor", None)))
        opt = self.optimizer
        flats = list(getattr(opt, "fp32_partitioned_groups_flat", None)
                     or getattr(opt, "single_partition_of_fp32_groups", []))
        optimizer = size(flats) + size(v for st in self.inner.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)
        grads = [f.grad for f in flats]
        for name in ("averaged_gradients", "grad_partitions_flat_buffer", "ipg_buffer"):
            v = getattr(opt, name, None)
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            for x in items:
                grads += list(x) if isinstance(x, (list, tuple)) else [x]
        grads += [p.grad for p in self.module.parameters()]
        return {"params": params, "grads": size(grads), "optimizer": optimizer}


class SnapshotRun:
    """A run seen through a snapshot of its DeepSpeed state: what ltk/parallel/shard_state.py
    and the checkpoint readers and writers need of a run (its module, mesh, data-parallel rank
    and an optimizer surface), with whole tensors that data-parallel rank 0 writes."""

    def __init__(self, run, snapshot: _Snapshot):
        self.run, self.snapshot, self.optimizer = run, snapshot, snapshot
        self.model, self.mesh, self.strategy, self.dp_rank = run.model, run.mesh, run.strategy, run.dp_rank

    def restore(self) -> None:
        """Collective: push what a load wrote into the snapshot back into DeepSpeed."""
        self.run.engine.restore(self.snapshot)
