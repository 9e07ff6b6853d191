"""Instruction tuning's model at set-up: the base with its adapter, and where its weights come from.

One process and ddp (`whole_base`): the base built whole, its weights read, its score before
training, then the adapter applied (LoRA's A drawn, QLoRA's NF4 codes computed).

zero3 / fsdp2 with an adapter (`adapted_on_meta`): the frozen base is never whole on a rank — the
FSDP + QLoRA recipes' "low-memory loading", done as pre-training's deferred init (ltk/models/init.py):

    1. the base built on the meta device (ltk/training/trainer_setup.py, build_model) and the adapter applied there
       (apply_adapter: LoRALinear modules; QLoRA's NF4Linear storage, shapes only)
    2. every meta tensor tagged with where its value comes from (init.py's `_ltk_init`: a fill
       function and a name, called on a full-size tensor when a rank needs that tensor):
           frozen base tensor   read from the base's files, that tensor only (ltk/training/base_stream.py)
           NF4 storage          its weight read and quantized as one process does (qlora._nf4 on the
                                run's device, from the same fp32 weight: per tensor and deterministic,
                                so the codes are one process's), the buffer cut from the result
           LoRA A, B            A drawn whole now, in one process's order and from its RNG stream
                                (kaiming uniform per module, sorted names: apply_lora's order); B zeros
    3. the engine is built: each rank materializes only the tensors that meet its shard, one at a
       time, and keeps its bytes (zero3: ltk/parallel/frozen_shard.py, zero3 `_init_shard`;
       fsdp2: `materialize_local`, each parameter's dim-0 block)
    4. the score before training on the sharded model (every rank runs the same forwards). QLoRA's
       is the NF4 base's: the full-precision base never exists whole anywhere.

The reader's ledger measures what this holds besides the shard (`load_summary`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ltk.training.adapters import apply_adapter
from ltk.training.base_stream import BaseReader

SHARDED = ("zero3", "fsdp2")


def sharded_setup(cfg, world: int) -> bool:
    """Whether the base is loaded shard by shard: an adapter on zero3 / fsdp2 over several ranks."""
    return world > 1 and cfg.parallel.strategy in SHARDED and cfg.adapter.method != "none"


def whole_base(model: nn.Module, cfg, base, task, device: torch.device, autocast, evaluate: bool):
    """The single-process set-up: weights, the score before (None unless `evaluate`), the adapter."""
    from ltk.training.checkpoint import restore_model

    restore_model(model, base.tensors())
    before = task.evaluate(model, device, autocast) if evaluate else None
    return apply_adapter(model, cfg.family, cfg.adapter).to(device), before


def adapted_on_meta(model: nn.Module, cfg, reader: BaseReader, device: torch.device) -> nn.Module:
    """`model` (built on meta by build_on_meta, its buffers real) with the adapter applied on meta
    and every meta tensor tagged with its value's source (module docstring, steps 1-2)."""
    from ltk.kernels.nf4 import NF4Linear
    from ltk.models.lora import LoRALinear, lora_modules

    own_init = model.init_parameter
    dtypes = {n: p.dtype for n, p in model.named_parameters()}  # the base's, as one process builds it
    missing = sorted(set(dtypes) - reader.names())
    if missing:
        raise ValueError(f"the base {reader.base.path} does not fit the model: missing {missing[:8]}")
    model = apply_adapter(model, cfg.family, cfg.adapter)
    fill = _BaseFill(reader, dtypes)
    for p in model.parameters():  # the frozen base tensors that stayed (not quantized away)
        tag = getattr(p, "_ltk_init", None)
        if tag is not None and tag[0] == own_init:
            p._ltk_init = (fill, tag[1])
    nf4 = _NF4Fill(reader, device, dtypes)
    for name, mod in model.named_modules():
        if isinstance(mod, NF4Linear):
            parent, _, attr = name.rpartition(".")
            src = parent if attr == "base" and isinstance(model.get_submodule(parent), LoRALinear) else name
            nf4.settings[src] = mod
            for k, t in list(mod._buffers.items()) + list(mod._parameters.items()):
                if t is not None:
                    t._ltk_init = (nf4, f"{src}:{k}")
    lora = lora_modules(model)
    for name in sorted(lora):  # apply_lora creates them in this order, each drawing its A
        m = lora[name]
        a = torch.empty(m.lora_A.shape, dtype=m.lora_A.dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoRALinear's draw
        m.lora_A._ltk_init = (_Value(a, reader), name + ".lora_A")
        m.lora_B._ltk_init = (_Zeros(m.lora_B), name + ".lora_B")
    return model


def sharded_loaded(reader: BaseReader, run, task, objective, rt, evaluate: bool) -> tuple[dict, dict | None]:
    """After the engine is built (step 4): what loading held (`load_summary`; the reader closed),
    and the score before training on the sharded model (None unless `evaluate`)."""
    load = load_summary(reader, run)
    reader.close()
    if not evaluate:
        return load, None
    before = task.evaluate(run.eval_share(objective).model, rt.device, rt.autocast())
    if hasattr(run.engine, "reshard"):  # FSDP2 keeps the root gathered after a forward without backward
        run.engine.reshard()
    return load, before


def load_summary(reader: BaseReader, run) -> dict[str, int]:
    """What set-up held of the frozen base on this rank: the ledger's peak beside the shard kept
    (zero3: frozen_bytes; fsdp2: the frozen parameters' local shards and NF4 statistics)."""
    from ltk.parallel.fsdp2 import local

    engine = run.engine
    if hasattr(engine, "frozen_bytes"):
        fz = engine.frozen_bytes()
        shard, whole = fz["shard"], fz["total"]
    else:
        from ltk.kernels.nf4 import NF4Linear

        frozen = [p for p in run.model.parameters() if not p.requires_grad]
        stats = [b for m in run.model.modules() if isinstance(m, NF4Linear) for b in m.buffers(recurse=False)]
        shard = sum(local(t).numel() * t.element_size() for t in frozen + stats)
        whole = sum(t.numel() * t.element_size() for t in frozen + stats)
    return {"whole_bytes": whole, "shard_bytes": shard, **reader.ledger.summary()}


class _Source:
    """A tag's init (ltk/models/init.py): `value(name)` is the tensor itself, fill(name, t) copies it."""

    def value(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, name: str, t: torch.Tensor) -> None:
        t.copy_(self.value(name))


class _BaseFill(_Source):
    """The base's tensor `name` read from its files, in the model's dtype (a cast copy is counted too)."""

    def __init__(self, reader: BaseReader, dtypes: dict[str, torch.dtype]):
        self.reader, self.dtypes = reader, dtypes

    def value(self, name: str) -> torch.Tensor:
        v = self.reader.read(name)
        return v if v.dtype == self.dtypes[name] else self.reader.ledger.hold(v.to(self.dtypes[name]))


class _NF4Fill(_Source):
    """value("src:buffer"): that buffer of the NF4 layer quantized from the base's `src`.weight (and
    .bias). The last layer quantized is kept, since its buffers are asked for one by one."""

    def __init__(self, reader: BaseReader, device: torch.device, dtypes: dict[str, torch.dtype]):
        self.reader, self.device, self.dtypes = reader, device, dtypes
        self.last: tuple[str, nn.Module] | None = None
        self.settings: dict[str, nn.Module] = {}  # src -> its meta NF4 layer (blocksize, compute dtype, backend)
        self.stats: dict[str, dict[str, torch.Tensor]] = {}  # src -> its fp32 statistics (4 bytes / 16,384 weights)
        reader.caches.append(self)

    def layer(self, src: str) -> nn.Module:
        from ltk.models.qlora import NF4LinearDQ, _nf4

        if self.last is None or self.last[0] != src:
            self.last = None  # the previous layer's codes go first
            like = self.settings[src]
            w = self.reader.read(src + ".weight").to(self.device, self.dtypes[src + ".weight"])
            b = None
            if src + ".bias" in self.dtypes:
                b = self.reader.read(src + ".bias").to(self.device, self.dtypes[src + ".bias"])
            m = _nf4(w, b, like.blocksize, like.compute_dtype, isinstance(like, NF4LinearDQ), like.backend)
            for t in list(m.buffers()) + list(m.parameters()):
                self.reader.ledger.hold(t)
            self.last = (src, m)
            if isinstance(m, NF4LinearDQ):  # fsdp2 asks for these replicated fp32 statistics in a later pass
                self.stats[src] = {k: b.cpu() for k, b in m.named_buffers() if b.is_floating_point()}
        return self.last[1]

    def value(self, key: str) -> torch.Tensor:
        src, _, attr = key.rpartition(":")
        if attr in self.stats.get(src, {}):
            return self.stats[src][attr]
        return getattr(self.layer(src), attr).detach().cpu()

    def clear(self) -> None:
        self.last, self.stats = None, {}


class _Value(_Source):
    def __init__(self, value: torch.Tensor, reader: BaseReader):
        self.v = value
        reader.caches.append(self)

    def value(self, name: str) -> torch.Tensor:
        if self.v is None:
            raise RuntimeError(f"{name}: its initial value was dropped once the base was loaded")
        return self.v

    def clear(self) -> None:
        self.v = None


class _Zeros(_Source):
    def __init__(self, like: torch.Tensor):
        self.shape, self.dtype = like.shape, like.dtype

    def value(self, name: str) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype)
