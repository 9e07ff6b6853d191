"""The one output-poisoning helper (ltk/kernels/poison.py): the flag is read at each
allocation, None means "under the interpreter", the context manager restores every flag, and
a module without the flag is refused by name."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from ltk.kernels.backend import interpreter_on
from ltk.kernels.poison import output_allocator, poison_outputs, poisoning


@pytest.fixture
def module():
    mod = types.ModuleType("ltk_test_poison_owner")
    mod.POISON_OUTPUTS = False
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def test_flag_read_at_each_allocation(module):
    empty = output_allocator(module.__name__)
    with poison_outputs(module):
        assert empty((2, 3), torch.float32, "cpu").isnan().all()
    assert module.POISON_OUTPUTS is False
    module.POISON_OUTPUTS = None
    assert poisoning(module.__name__) == interpreter_on()
    assert empty((4,), torch.bfloat16, "cpu").isnan().all() == interpreter_on()


def test_restored_after_an_error_and_refused_without_a_flag(module):
    other = types.ModuleType("no_flag")
    with pytest.raises(AttributeError, match="no_flag has no POISON_OUTPUTS"):
        with poison_outputs(module, other):
            pass
    with pytest.raises(RuntimeError), poison_outputs(module):
        assert module.POISON_OUTPUTS is True
        raise RuntimeError
    assert module.POISON_OUTPUTS is False


def test_every_kernel_module_uses_it():
    import ltk.kernels.layernorm as ln
    import ltk.kernels.lora_triton as lt
    import ltk.kernels.rmsnorm as rn

    for mod in (ln, lt, rn):
        with poison_outputs(mod):
            assert mod._empty((3,), torch.float32, "cpu").isnan().all(), mod.__name__
