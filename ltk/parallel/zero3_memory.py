"""What a ZeRO-3 rank holds, in the components of ltk/models/qlora.py `memory_breakdown`.

The model's own tensors say little under ZeRO-3 (ltk/parallel/zero3.py): between gathers every
parameter and NF4 buffer is a view of a unit's storage resized to 0 bytes. What the rank holds is
the engine's: per unit the trainable flat shard (s_u elements, the parameters; under fp32 also
the optimizer's master), the gradient shard it accumulates (reduce dtype), the fp32 master where it
is a separate tensor (mixed precision), Adam's state on the master pieces, and the frozen byte
shard (ltk/parallel/frozen_shard.py), whose bytes count for the tensor they belong to: a tensor
owns [its offset, the next tensor's offset) of the unit's byte vector (alignment padding
included), the last tensor up to the padded end. Gathered storage counts while it exists (0 at
rest). Not counted: the fp32 gradient copy made for the step under bf16 (`grad32`, freed by
zero_grad), as memory_breakdown leaves out MasterOptimizer's master gradients.
"""
from __future__ import annotations

import torch

from ltk.parallel.frozen_shard import FrozenBytes


def frozen_kind(fb: FrozenBytes, i: int) -> str:
    """memory_breakdown's component of entry i: frozen parameters (NF4 biases too) are full
    precision; an NF4 layer's buffers its packed codes or its statistics."""
    e = fb.entries[i]
    return "base_full" if e.is_param else "base_nf4_packed" if e.attr == "packed" else "base_nf4_stats"


def frozen_held(fb: FrozenBytes) -> dict[str, int]:
    """Bytes of this rank's shard of fb by component (module docstring); they sum to fb.shard_bytes."""
    lo, hi = fb.comm.rank * fb.shard_bytes, (fb.comm.rank + 1) * fb.shard_bytes
    out: dict[str, int] = {}
    for i, start in enumerate(fb.offsets):
        end = fb.offsets[i + 1] if i + 1 < len(fb.offsets) else fb.padded
        k = frozen_kind(fb, i)
        out[k] = out.get(k, 0) + max(0, min(end, hi) - max(start, lo))
    return out


def zero3_breakdown(engine, model: torch.nn.Module) -> dict[str, int]:
    """memory_breakdown's dict (with "total") for a Zero3Engine's rank (module docstring)."""
    out = dict(base_nf4_packed=0, base_nf4_stats=0, base_full=0, trainable=0, gradients=0, optimizer_states=0)
    seen: set = set()

    def add(key: str, t: torch.Tensor | None) -> None:
        if t is None or not t.untyped_storage().nbytes() or t.untyped_storage().data_ptr() in seen:
            return
        seen.add(t.untyped_storage().data_ptr())
        out[key] += t.untyped_storage().nbytes()

    for u in engine.units:
        if u.frozen is not None:
            for k, v in frozen_held(u.frozen).items():
                out[k] += v
            add("base_full", u.frozen.full)  # gathered now (0 bytes at rest)
        if u.layout is not None:
            add("trainable", u.shard)
            add("trainable", u.full)  # 0 bytes at rest
            add("gradients", u.grad_shard)
            add("optimizer_states", u.master)  # the shard itself in fp32 (seen): counted once
    for b in model.buffers():  # besides NF4's (views of the frozen bytes): none in our models, a RoPE table would be
        add("base_full", b)
    for state in engine.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                add("optimizer_states", v)
    out["total"] = sum(out.values())
    return out
