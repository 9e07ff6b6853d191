"""Peak tensor memory of one call on any device, a CPU included: the high-water mark of the bytes
held by tensor storages created during the call.

CUDA's caching allocator keeps a resettable high-water mark (`torch.cuda.max_memory_allocated`); a
CPU has none (the process's peak RSS is one mark for the whole run and counts the allocator's
caching). So on a CPU we count tensors ourselves: a TorchDispatchMode sees every ATen op, including
those autograd runs in the backward and the optimizer's; each new storage among an op's outputs adds
its bytes and a weak reference whose callback subtracts them when the storage is freed.

    with LiveBytes() as lb:
        step()
    lb.peak      # bytes: the most that was alive at once, of what the call allocated

What is not counted: storages that existed before the call (parameters, optimizer states; an op
that writes in place returns its input's storage, which is recognized and skipped), and memory an
op allocates and frees inside itself (a matmul's workspace) — so the figure is the tensors autograd
and the model hold, what a memory saving such as never building the logits removes.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(tree) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Track the bytes of the storages created while active: `live` now, `peak` the maximum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}  # storage key -> weak reference, while alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {st._cdata for st in _storages((args, kwargs))}
        for st in _storages(out):
            key = st._cdata  # the C storage's address: unique while it is alive
            if key in self._refs or key in inputs or st.nbytes() == 0:
                continue  # seen already, or written in place into an input (existing memory)
            n = st.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            self._refs[key] = weakref.ref(st, lambda _, key=key, n=n: self._free(key, n))
        return out

    def _free(self, key: int, n: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= n


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, buffers and optimizer state (each storage once: tied weights)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def step_peak_mb(step, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Peak MiB of one training step: what it allocates at most at once (activations, logits,
    gradients, temporaries) + the model's and optimizer's state, measured with LiveBytes."""
    with LiveBytes() as lb:
        step()
    return (lb.peak + state_bytes(model, optimizer)) / 2**20
