"""The tensors of a model as it fine-tunes, by sharding unit, and the bytes one rank of each
engine holds of them: the exact per-rank layouts behind ltk/parallel/plan_finetune.py.

The model is built on the meta device and adapted by the run's own function (ltk/training/
adapters.py `apply_adapter`: LoRALinear, QLoRA's NF4LinearDQ storage, shapes only), so every
tensor a run holds is here with its shape and dtype. The units are ZeRO-3's and FSDP2's: each
transformer block (zero3.py `default_units`, fsdp2.py `blocks`) and the root, which holds the rest
(a tensor tied across units belongs to the root). Rank r of N holds, in memory_breakdown's
components (ltk/models/qlora.py):

none / ddp   every tensor as one process stores it; under bf16 the trainable ones in bf16, with
             an fp32 master each (MasterOptimizer; the frozen base stays as loaded).

zero3        (zero3.py, frozen_shard.py) a unit's trainable tensors are one flat vector of ψ_u
             elements in the compute dtype, ordered by AdamW group and padded to N·s_u,
             s_u = ⌈ψ_u/N⌉: the rank holds s_u of it, s_u gradient elements (reduce dtype = compute
             dtype), Adam's two fp32 moments (under bf16 also the fp32 master shard), and one
             4-byte `step` per piece it steps: each group whose range of the flat vector meets
             [r·s_u, (r+1)·s_u) (the last group's range takes the padding). The unit's frozen
             tensors (frozen parameters cast to the compute dtype, NF4 buffers as they are) are
             one byte vector, each tensor starting at a multiple of ALIGN = 16 bytes, padded to N·f_u,
             f_u = ⌈bytes/N⌉: the rank holds bytes [r·f_u, (r+1)·f_u). A byte counts for the tensor
             it belongs to, an alignment or end pad for the tensor before it: every rank holds the
             same total, its split into full-precision / NF4 codes / statistics depends on r.
             The padding is < 16 bytes a frozen tensor plus < N bytes a unit (+ < N elements a unit
             for the trainable vector).

fsdp2        (torch's fully_shard, fsdp2.py) each parameter on its own: dim 0 cut into N chunks of
             c = ⌈d_0/N⌉ rows (torch.chunk); every rank allocates c rows (the last ones padded)
             and holds min(c, max(0, d_0 − r·c)) rows. QLoRA's integer NF4 buffers are parameters
             here (fsdp2.py `storage_as_parameters`); its fp32 scales and offset stay whole on every
             rank. Parameters keep the dtype they were built in (FSDP2's MixedPrecisionPolicy casts
             the gathered copies only), so a bf16 run holds fp32 adapters, fp32 gradient shards and
             fp32 moments, and no separate master. A unit's gradient shards are one padded
             reduce-scatter output, c·(numel/d_0) elements per trainable tensor; the moments have the
             rows held (no padding); one `step` per trainable tensor. A tensor with no row on r
             counts 0 there (memory_breakdown counts storages behind non-empty tensors).

Rank 0 holds the most under both (the same total everywhere under zero3; under fsdp2 the last
ranks' moments may be shorter by the padded rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ltk.parallel.frozen_shard import ALIGN

KINDS = ("base_nf4_packed", "base_nf4_stats", "base_full", "trainable")


@dataclass
class Tensor:
    """One tensor of the adapted model as one process stores it."""

    kind: str  # a memory_breakdown key (KINDS)
    shape: tuple[int, ...]
    elem: int  # bytes an element
    floating: bool
    nf4_buffer: bool = False  # a buffer of an NF4 layer (else a parameter)
    group: int = -1  # a trainable tensor's AdamW group: 0 matrices (decay), 1 vectors

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass
class Unit:
    """A sharding unit: its trainable tensors in zero3's flat order, its frozen ones in frozen_shard's."""

    name: str
    trainable: list[Tensor] = field(default_factory=list)
    frozen: list[Tensor] = field(default_factory=list)

    def frozen_bytes(self, kind: str) -> int:
        return sum(t.numel * t.elem for t in self.frozen if t.kind == kind)

    @property
    def psi(self) -> int:
        """ψ_u: trainable elements."""
        return sum(t.numel for t in self.trainable)


def layout(family: str, cfg, method: str, r: int, targets: str, compute_dtype: str):
    """(units: the root first, then the blocks; the adapted meta model; Ψ, the base's parameters) of
    one fine-tuning setting."""
    from ltk.models import get_family
    from ltk.parallel.frozen_shard import frozen_tensors
    from ltk.parallel.zero3 import default_units
    from ltk.training.adapters import apply_adapter
    from ltk.training.config import AdapterConfig

    with torch.device("meta"):
        model = get_family(family).model_cls(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    adapter = AdapterConfig(method="none" if method == "full" else method, r=r, targets=targets,
                            compute_dtype=compute_dtype)
    model = apply_adapter(model, family, adapter)  # raises for a pattern that matches nothing, or a tied weight
    mod_name = {id(m): n for n, m in model.named_modules()}
    prefixes = [mod_name[id(m)] + "." for m in default_units(model)]
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)

    def owner(ns: list[str]) -> int:  # 0 the root, i + 1 block i (zero3.py's rule for tied tensors)
        units = {next((i + 1 for i, pre in enumerate(prefixes) if n.startswith(pre)), 0) for n in ns}
        return units.pop() if len(units) == 1 else 0

    units = [Unit("root")] + [Unit(pre[:-1]) for pre in prefixes]
    for p in model.parameters():  # each tensor once, in model order (a unit's flat order before sorting)
        if p.requires_grad:
            units[owner(names[id(p)])].trainable.append(
                Tensor("trainable", tuple(p.shape), p.element_size(), p.is_floating_point(), group=int(p.dim() < 2)))
    for u in units:
        u.trainable.sort(key=lambda t: t.group)  # zero3 orders a unit's flat vector by group (stable)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for e in frozen_tensors(model, trainable, torch.float32):
        t = e.tensor
        kind = "base_full" if e.is_param else "base_nf4_packed" if e.attr == "packed" else "base_nf4_stats"
        units[owner(names.get(id(t), [e.name]))].frozen.append(
            Tensor(kind, tuple(t.shape), t.element_size(), t.is_floating_point(), nf4_buffer=not e.is_param))
    return units, model, num_params


def _overlap(a: int, b: int, lo: int, hi: int) -> int:
    return max(0, min(b, hi) - max(a, lo))


def zero3_frozen(u: Unit, world: int, rank: int, compute_bytes: int) -> tuple[dict[str, int], int]:
    """(bytes of u's frozen vector rank `rank` holds, by kind; f_u): the layout of frozen_shard.py."""
    sizes = [t.numel * (compute_bytes if t.floating and not t.nf4_buffer else t.elem) for t in u.frozen]
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += -(-n // ALIGN) * ALIGN
    f = -(-max(off, 1) // world)
    lo, hi = rank * f, (rank + 1) * f
    out = dict.fromkeys(KINDS, 0)
    for i, t in enumerate(u.frozen):  # a tensor owns its bytes and the padding after it
        end = offsets[i + 1] if i + 1 < len(offsets) else world * f
        out[t.kind] += _overlap(offsets[i], end, lo, hi)
    return out, f


def zero3_pieces(u: Unit, world: int, rank: int) -> int:
    """Optimizer pieces (one `step` each) of u's flat vector on `rank`: groups meeting its shard."""
    s = -(-u.psi // world)
    starts, off = {}, 0
    for t in u.trainable:
        starts.setdefault(t.group, off)
        off += t.numel
    bounds = sorted(starts.values()) + [world * s]
    return sum(_overlap(a, b, rank * s, (rank + 1) * s) > 0 for a, b in zip(bounds, bounds[1:]))


def fsdp2_rows(t: Tensor, world: int, rank: int) -> tuple[int, int]:
    """(c, rows held): FSDP2's chunk of dim 0 on `rank`."""
    c = -(-t.rows // world)
    return c, min(c, max(0, t.rows - rank * c))


def held(units: list[Unit], strategy: str, world: int, rank: int, dtype: str) -> dict[str, int]:
    """Bytes rank `rank` of `world` holds by memory_breakdown's component (module docstring)."""
    bf16 = dtype == "bf16"
    out = dict.fromkeys((*KINDS, "gradients", "optimizer_states"), 0)
    for u in units:
        if strategy == "zero3":
            cb = 2 if bf16 else 4
            frozen, _ = zero3_frozen(u, world, rank, cb)
            for k, v in frozen.items():
                out[k] += v
            if u.trainable:
                s = -(-u.psi // world)
                out["trainable"] += cb * s
                out["gradients"] += cb * s
                out["optimizer_states"] += (12 if bf16 else 8) * s + 4 * zero3_pieces(u, world, rank)
        elif strategy == "fsdp2":
            grads, any_rows = 0, False
            for t in u.frozen + u.trainable:
                if t.nf4_buffer and t.floating:  # NF4's fp32 statistics: buffers, whole on every rank
                    out[t.kind] += t.numel * t.elem
                    continue
                c, rows = fsdp2_rows(t, world, rank)
                per_row = t.numel // t.rows
                out[t.kind] += c * per_row * t.elem if rows else 0
                if t.kind == "trainable":
                    grads += c * per_row * t.elem
                    any_rows |= rows > 0
                    out["optimizer_states"] += 2 * rows * per_row * t.elem + 4
            out["gradients"] += grads if any_rows else 0
        else:  # replicated
            for t in u.frozen:
                out[t.kind] += t.numel * t.elem
            for t in u.trainable:
                tb = 2 if bf16 else t.elem
                out["trainable"] += tb * t.numel
                out["gradients"] += tb * t.numel
                out["optimizer_states"] += (12 if bf16 else 2 * t.elem) * t.numel + 4
    return out


def gathered_unit_bytes(u: Unit, strategy: str, world: int, dtype: str) -> int:
    """Bytes of u as one all-gather moves it (the payload, padding included)."""
    bf16 = dtype == "bf16"
    if strategy == "zero3":
        cb = 2 if bf16 else 4
        f = zero3_frozen(u, world, 0, cb)[1] if u.frozen else 0
        return world * f + world * -(-u.psi // world) * cb
    total = 0
    for t in u.frozen + u.trainable:
        if not (t.nf4_buffer and t.floating):
            c, _ = fsdp2_rows(t, world, 0)
            total += world * c * (t.numel // t.rows) * (2 if bf16 and t.floating else t.elem)
    return total


def reduced_unit_bytes(u: Unit, strategy: str, world: int, dtype: str) -> int:
    """Bytes of u's gradients as one reduce-scatter moves them (padding included)."""
    bf16 = dtype == "bf16"
    if strategy == "zero3":
        return world * -(-u.psi // world) * (2 if bf16 else 4)
    return sum(world * fsdp2_rows(t, world, 0)[0] * (t.numel // t.rows) * (2 if bf16 else t.elem)
               for t in u.trainable)
