"""Mixed precision for the replicated engines (one process, DDP, naive DDP, torch DDP, the
pipeline): bf16 parameters for compute, an fp32 master copy for the update (Micikevicius et al.
2018, "Mixed Precision Training", §3.1; ZeRO's K = 12 with Adam, Rajbhandari et al. 2020 §3.1).

    forward/backward   the model's parameters are bf16, so the activations, the gradients and
                       every collective on them are bf16 (p = g = 2 bytes, cost.Precision.of)
    reduction          in the gradient dtype, or in `reduce_dtype` fp32 where asked: the sum over
                       ranks then rounds once instead of once per addition (FSDP2's reduce_dtype)
    update             g32 = fp32(g); clip ‖g32‖; AdamW on the fp32 master w32 (m, v fp32);
                       w = bf16(w32). A step too small for bf16 (lr·update < ulp(w)/2) still
                       moves the master, so it is not lost, only deferred.

No autocast is needed for the weights: they are already in the compute dtype (see
ltk/training/runtime.py). The ZeRO engines (zero.py, zero3.py) shard the same scheme: their fp32
master is the shard.

`MasterOptimizer` wraps the caller's optimizer factory: it is built on the fp32 parameters
(the same initial weights as an fp32 run), keeps them as masters, and casts the model's
parameters to the compute dtype in place, so an engine built after it (DDP's buckets, torch's
DDP) sees bf16 parameters. Its `param_groups` and `state` are the inner optimizer's (on the
masters): learning-rate schedules and state dicts by name work as with a plain optimizer.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def as_dtype(name) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or the torch dtype itself) -> torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class MasterOptimizer:
    """An optimizer over fp32 masters of bf16 parameters (module docstring)."""

    def __init__(self, param_groups, factory: Callable, dtype=torch.bfloat16):
        self.dtype = as_dtype(dtype)
        groups = list(param_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # (model parameter, fp32 master)
        master_groups = []
        for g in groups:
            ms = []
            for p in g["params"]:
                m = p.detach().clone().float()  # from the fp32 weights: the same start as an fp32 run
                self.pairs.append((p, m))
                ms.append(m)
            master_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ms})
        with torch.no_grad():
            for p, _ in self.pairs:
                p.data = p.data.to(self.dtype)
        self.inner = factory(master_groups)
        self.master_of = {id(p): m for p, m in self.pairs}
        self._prepared = False
        self._post_hooks: OrderedDict[int, Callable] = OrderedDict()  # weak-referenceable, as torch's

    # the optimizer interface the loop and the state dicts use
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def masters(self) -> list[torch.Tensor]:
        return [m for _, m in self.pairs]

    def prepare_grads(self, grads: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """master.grad = fp32 of the parameter's gradient (or of grads[id(p)], an engine's own fp32
        reduction), once per step; returns the master gradients that exist."""
        if not self._prepared:
            for p, m in self.pairs:
                g = grads.get(id(p)) if grads is not None else None
                g = p.grad if g is None else g
                m.grad = None if g is None else g.detach().float().reshape(m.shape)
            self._prepared = True
        return [m.grad for _, m in self.pairs if m.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        self.prepare_grads()
        self.inner.step()
        for p, m in self.pairs:
            p.copy_(m)  # round to the compute dtype
            m.grad = None  # the fp32 gradient copy lives only from prepare_grads to here: 4 bytes/param less
        self._prepared = False
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})

    def register_step_post_hook(self, hook: Callable):
        """torch.optim.Optimizer's hook(optimizer, args, kwargs), run after the whole step (the
        compute-dtype weights written back); returns a handle with .remove()."""
        from torch.utils.hooks import RemovableHandle

        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self.pairs:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)
            m.grad = None
        self._prepared = False

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(sd)

    def master_state(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """The fp32 weights by the parameters' names (what a checkpoint saves)."""
        return {names[id(p)]: m.detach().clone() for p, m in self.pairs if id(p) in names}

    @torch.no_grad()
    def load_masters(self, values: dict[int, torch.Tensor]) -> None:
        for p, m in self.pairs:
            if id(p) in values:
                m.copy_(values[id(p)])
                p.copy_(m)


def mixed_factory(factory: Callable, dtype) -> Callable:
    """The optimizer factory an engine calls, made mixed precision when `dtype` is not fp32."""
    dt = as_dtype(dtype)
    if dt == torch.float32:
        return factory
    return lambda groups: MasterOptimizer(groups, factory, dt)


def clip_(owners: Iterable[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s rule on the .grad of `owners` (fp32 masters): ‖g‖ over
    all, each scaled by min(1, max_norm / (‖g‖ + 1e-6)) when max_norm is finite."""
    import math

    owners = [t for t in owners if t.grad is not None]
    if not owners:
        return 0.0
    norm = torch.nn.utils.get_total_norm([t.grad for t in owners])
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(owners, max_norm, norm)
    return norm.item()
