"""How big a model is before it exists: its parameter count from the config, in bytes, against
the memory that is free.

A config is a handful of integers, and a crafted one (n_layer 1e9 in a run's config.json, a
vocabulary of 1e12 in a Hugging Face config.json) asks for more memory than any machine has:
building it allocates until the process is killed, or the machine swaps to a halt. Every
family's `num_params` is a plain function of its config, so the size is known first and a model
that cannot fit is refused with the numbers and the fields to lower.

    bytes per parameter       2   a checkpoint's tensors as loaded (16-bit at the least)
                              4   the model's fp32 weights
                             16   training: fp32 weights + gradients + AdamW's two moments

These are lower bounds: activations, the data and the framework come on top. Passing the check
does not promise that a run fits; failing it proves that it cannot.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

CHECKPOINT_BYTES = 2
WEIGHT_BYTES = 4
TRAIN_BYTES = 16


def family_of(cfg: Any):
    """The ltk.models Family whose config class `cfg` is."""
    from ltk.models import FAMILIES

    for fam in FAMILIES.values():
        if isinstance(cfg, fam.config_cls):
            return fam
    raise TypeError(f"{type(cfg).__name__} is not the config of a model family")


def parameter_count(cfg: Any) -> float:
    return family_of(cfg).num_params(cfg)


def fields_to_lower(cfg: Any, budget: float) -> list[str]:
    """The fields that could bring the count within `budget` parameters on their own (set to 1);
    where none can, those whose minimum removes the most."""
    total = _float(parameter_count(cfg))
    alone, helps = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 1:
            continue
        try:
            least = _float(parameter_count(dataclasses.replace(cfg, **{f.name: 1})))
        except (ArithmeticError, ValueError, TypeError):
            continue
        name = f"model.{f.name} ({v:,})" if isinstance(v, int) and v < 10**15 else f"model.{f.name} ({v:.4g})"
        (alone if least <= budget else helps).append((least, name))
    found = alone or [h for h in helps if not math.isfinite(total) or h[0] <= 0.75 * total]
    return [name for _, name in sorted(found)]


def available_bytes(device: Any = "cpu") -> int:
    """Free memory on `device`: a CUDA device's free bytes, or the host's available memory
    (psutil, else /proc/meminfo), capped by a cgroup (container) limit where there is one."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())[0]
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def _float(n: float) -> float:
    try:
        return float(n)
    except OverflowError:  # an integer count beyond a double's range
        return math.inf


def format_bytes(n: float) -> str:
    if not math.isfinite(n):
        return f"{n} bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(cfg: Any, bytes_per_param: float, device: Any = "cpu", *, what: str = "fp32 weights",
               where: str = "", copies: int = 1) -> None:
    """Refuse (ValueError) a model whose `bytes_per_param` x parameters (x `copies`: processes
    sharing the memory) exceeds what `device` has free; `where` prefixes the message (a file)."""
    n = _float(parameter_count(cfg))
    need = n * bytes_per_param * copies
    if math.isfinite(need) and need <= available_bytes(device):
        return
    import torch

    if math.isnan(n):
        raise ValueError(f"{where}the {family_of(cfg).name} model's size is not a number: every field of "
                         f"{type(cfg).__name__} must be a finite number, got {cfg}")
    free = available_bytes(device)
    fields = fields_to_lower(cfg, free / (bytes_per_param * copies))
    fields = fields or [f"the model's sizes ({', '.join(f.name for f in dataclasses.fields(cfg))})"]
    each = f"{bytes_per_param:g} bytes per parameter: {what}" + (f", x {copies} processes" if copies > 1 else "")
    raise ValueError(
        f"{where}the {family_of(cfg).name} model is too large: {n:.4g} parameters need at least "
        f"{format_bytes(need)} ({each}), but {torch.device(device)} has {format_bytes(free)} "
        f"free; lower {', '.join(fields)}"
    )
