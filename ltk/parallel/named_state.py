"""Weights and optimizer state by parameter name, the form every checkpoint of the project uses
(ltk/parallel/strategy.py, ltk/training/checkpoint.py): positions in a torch optimizer's state
change with the engine, the world size and the model's wrappers; names do not.

    param_names        id -> name of every parameter, and of its fp32 master (mixed precision)
    master_weights     a state dict whose weights are the fp32 masters the optimizer updates
    by_name_state      a torch optimizer's state keyed by name; load_by_name_state its inverse
    aliases            keys that share storage (GPT's tied lm_head.weight -> wte.weight)
"""
from __future__ import annotations

from typing import Any

import torch

from ltk.parallel.mixed import MasterOptimizer


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module under torch.compile's wrapper (whose parameter names gain a prefix)."""
    return getattr(model, "_orig_mod", model)


def param_names(model: torch.nn.Module, optimizer) -> dict[int, str]:
    """id -> name of every parameter, and of its fp32 master under mixed precision (the tensor
    the optimizer holds), so optimizer state is saved and loaded by the parameter's name."""
    names = {id(p): n for n, p in unwrapped(model).named_parameters()}
    if isinstance(optimizer, MasterOptimizer):
        names.update({id(m): names[id(p)] for p, m in optimizer.pairs if id(p) in names})
    return names


def master_weights(model: torch.nn.Module, optimizer, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict whose parameters are the fp32 masters where the optimizer keeps them (a
    checkpoint saves the weights the update works on, not their bf16 rounding)."""
    if not isinstance(optimizer, MasterOptimizer):
        return sd
    masters = optimizer.master_state({id(p): n for n, p in unwrapped(model).named_parameters()})
    return {k: masters[k] if k in masters else v for k, v in sd.items()}


def by_name_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """A torch optimizer's state keyed by parameter name instead of position (the format the
    ZeRO engines consolidate to)."""
    state = {names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
             for g in optimizer.param_groups for p in g["params"] if p in optimizer.state}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_by_name_state(optimizer: torch.optim.Optimizer, names: dict[int, str], sd: dict[str, Any]) -> None:
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"optimizer state has {len(sd['param_groups'])} param groups, this run has "
                         f"{len(optimizer.param_groups)}")
    for g, saved in zip(optimizer.param_groups, sd["param_groups"]):
        ours = [names[id(p)] for p in g["params"]]
        if set(ours) != set(saved["params"]):
            raise ValueError(f"param group names differ: {sorted(set(ours) ^ set(saved['params']))}")
        g.update({k: v for k, v in saved.items() if k != "params"})
        for p in g["params"]:
            if names[id(p)] in sd["state"]:
                # clone every tensor, 0-d step counters too: a counter shared by several
                # parameters (as a consolidated state may hold it) would be advanced once per parameter
                optimizer.state[p] = {k: (v.clone().to(p.device if v.dim() else v.device) if torch.is_tensor(v) else v)
                                      for k, v in sd["state"][names[id(p)]].items()}


def aliases(model: torch.nn.Module) -> dict[str, str]:
    """state-dict key -> the key it shares storage with first (GPT: lm_head.weight -> wte.weight)."""
    first, out = {}, {}
    for k, t in model.state_dict(keep_vars=True).items():
        twin = first.setdefault(id(t), k)
        if twin != k:
            out[k] = twin
    return out
