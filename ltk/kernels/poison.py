"""Output poisoning, one helper for every op: each kernel module that allocates outputs has a
module-level flag `POISON_OUTPUTS` and allocates every buffer a kernel writes with
`output_allocator(__name__)`. With the flag on (tests, the GPU check), buffers start as NaN,
so an element a kernel forgets to write fails the comparison instead of passing with
whatever stale memory held.

    POISON_OUTPUTS = False                  # True: NaN-filled outputs; None: on under the interpreter
    _empty = output_allocator(__name__)     # _empty(shape, dtype, device)

    with poison_outputs(module_a, module_b):   # tests: on for the block, restored after
        ...

The flag is read at each allocation, not captured at import, so flipping it takes effect at once.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from types import ModuleType

import torch

from ltk.kernels.backend import interpreter_on, output_buffer


def poisoning(module_name: str) -> bool:
    """Whether the module `module_name` poisons its outputs now: its POISON_OUTPUTS, where
    None means "under the interpreter" (on for the CPU tests, off on a GPU for speed)."""
    module = sys.modules[module_name]
    if not hasattr(module, "POISON_OUTPUTS"):
        raise AttributeError(f"{module_name} has no POISON_OUTPUTS flag: define it beside its output_allocator")
    flag = module.POISON_OUTPUTS
    return interpreter_on() if flag is None else bool(flag)


def output_allocator(module_name: str) -> Callable[..., torch.Tensor]:
    """`empty(shape, dtype, device)` for the kernels of `module_name`: torch.empty, or a NaN
    fill while that module's POISON_OUTPUTS says so."""
    def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
        return output_buffer(shape, dtype, device, poisoning(module_name))
    return empty


@contextlib.contextmanager
def poison_outputs(*modules: ModuleType):
    """Set POISON_OUTPUTS on each module for the block, restoring the old values after."""
    for module in modules:
        if not hasattr(module, "POISON_OUTPUTS"):
            raise AttributeError(f"{module.__name__} has no POISON_OUTPUTS flag: it cannot poison its outputs")
    old = [module.POISON_OUTPUTS for module in modules]
    try:
        for module in modules:
            module.POISON_OUTPUTS = True
        yield
    finally:
        for module, flag in zip(modules, old):
            module.POISON_OUTPUTS = flag
