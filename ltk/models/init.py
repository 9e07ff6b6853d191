"""Initialization that does not need the whole model: every parameter's initial value is a
function of (the model's init seed, the parameter's name) alone.

Why. A model that does not fit one device cannot be built and then cut: under ZeRO-3, tensor
and pipeline parallelism each rank must create only its own shard. So the model is built with
its parameters on the meta device (shapes and dtypes, no storage: `meta_parameters`), and each
rank later materializes exactly what it keeps, one parameter at a time (`materialized`). For the
shards to be the single-process model cut in pieces, a parameter's value must not depend on
what was initialized before it, which the usual `nn.init.normal_(p)` on the global generator
does (its stream advances parameter by parameter). Here each parameter draws from its own
generator, seeded by

    seed(p) = hash(init_seed, name(p))           (init_seed: one draw from the global RNG,
                                                  made when the model is constructed)

so `torch.manual_seed(s); GPT(cfg)` gives the same weights whether built whole on one process or
materialized shard by shard on N (PyTorch's own answer is torchtitan's `init_weights` after
`to_empty`; the per-name seed is what makes it exact under any sharding).

The models (ltk/models/gpt.py, llama.py, bert.py, t5.py) implement `init_parameter(name, t)`:
fill tensor t (full size) as parameter `name` starts.

Buffers (RoPE tables, position ids) stay real: they are small and computed in constructors.
This is `accelerate`'s `init_empty_weights(include_buffers=False)`, written out.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive seeds apart


def draw_init_seed() -> int:
    """One draw from the global CPU generator (on CPU even inside a `torch.device("meta")` block)."""
    return int(torch.randint(0, 2**62, (1,), device="cpu"))


def param_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator parameter `name` draws its initial value from (see the module docstring)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * _MIX + zlib.crc32(name.encode())) % 2**63)
    return g


def init_parameters(model: nn.Module, init: Callable[[str, torch.Tensor], None]) -> None:
    """Fill every real (non-meta) parameter by name; a tied parameter once, under its first name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_meta:
                init(name, p)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside this block every nn.Parameter registered on a module lands on the meta device, and
    remembers how to become real (`materialized`): the model's init_parameter under its name,
    attached once construction ends. Buffers stay where they were created."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """build() with parameters on the meta device, each tagged with (its model's init, its name)."""
    with meta_parameters():
        model = build()
    if not hasattr(model, "init_parameter"):
        raise TypeError(f"{type(model).__name__} has no init_parameter(name, tensor): it cannot be built "
                        "shard by shard (see ltk/models/init.py)")
    for name, p in model.named_parameters():
        p._ltk_init = (model.init_parameter, name)
    return model


def materialized(p: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The full initial value of parameter p as a new tensor: p itself when it is real, else
    computed from its tag (one parameter's worth of memory, freed by the caller)."""
    if not p.is_meta:
        return p.detach()
    tag = getattr(p, "_ltk_init", None)
    if tag is None:
        raise ValueError(f"a meta parameter of shape {tuple(p.shape)} has no init tag: build the model "
                         "with ltk.models.init.build_on_meta")
    return initial_value(tag, p.shape, p.dtype).to(device)


def initial_value(tag: tuple, shape, dtype: torch.dtype) -> torch.Tensor:
    """The full value a tag (init, name) makes: init(name, t) fills a fresh CPU tensor t, as a model
    built whole is initialized; an init with a `value(name)` method (a tensor read from a file,
    ltk/training/instruct_setup.py) gives that tensor itself, so it is not copied once more."""
    init, name = tag
    if hasattr(init, "value"):
        v = init.value(name)
        if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
            raise ValueError(f"{name}: the source gives {v.dtype} {tuple(v.shape)}, the model has {dtype} "
                             f"{tuple(shape)}")
        return v
    t = torch.empty(shape, dtype=dtype)
    with torch.no_grad():
        init(name, t)
    return t


def make_real(p: nn.Parameter, value: torch.Tensor) -> None:
    """Turn (meta) parameter p into a real one holding `value`, keeping the Python object (ties,
    param groups and optimizer references stay valid). `p.data = value` refuses meta -> cpu."""
    if not p.is_meta:
        p.data = value
        return
    tag = getattr(p, "_ltk_init", None)
    # a fresh real parameter first, then .data: p keeps a version counter of its own, not that of
    # `value`'s storage (an engine gathering into that storage must not look like an in-place edit)
    torch.utils.swap_tensors(p, nn.Parameter(value.new_empty(0), requires_grad=p.requires_grad))
    p.data = value
    if tag is not None:
        p._ltk_init = tag


def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Make every meta parameter of model real, one at a time (a tied parameter once)."""
    for _, p in model.named_parameters():
        if p.is_meta:
            make_real(p, materialized(p, device))
    return model


def is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def move_buffers(model: nn.Module, device: torch.device | str) -> nn.Module:
    """model.to(device) for the buffers alone (Module.to refuses to copy meta parameters)."""
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)
    return model
