"""The frozen part of a ZeRO-3 unit, sharded as bytes: LoRA's frozen base weights and QLoRA's NF4
storage (packed uint8 codes, double-quantized absmax codes, fp32 scales and offset).

A frozen tensor has no gradient and no optimizer state, so the unit keeps of it only its bytes:
every frozen tensor of the unit (parameters with requires_grad False, and the buffers of
NF4Linear modules) is laid end to end in one uint8 vector, each starting at a multiple of ALIGN
bytes (so that a slice can be viewed as fp32 / bf16 again), zero-padded to N·s bytes; rank r keeps
bytes [r·s, (r+1)·s):

    bytes = [ W_1 (fp32) | pad | packed_2 (uint8) | pad | scales_2 (fp32) | ... | 0 pad ]   (N·s,)
            [ rank 0     |    rank 1     | ... | rank N-1 ]                                 s each

Whatever the dtypes, one all-gather of N·s bytes makes the whole unit's frozen tensors, which are
views of that buffer (`full`, resized to 0 bytes while not gathered), as the trainable part's
parameters are views of its flat buffer (ltk/parallel/zero3.py). This is what the FSDP + QLoRA
recipes do (Answer.AI's fsdp_qlora stores the 4-bit codes in a float "quant_storage" dtype so that
FSDP shards them like any weight); a byte vector is the dtype-free form of the same idea, and it
keeps the NF4 codes identical on every rank (each rank's shard is cut from the same quantization).

Frozen floating parameters take the engine's compute dtype (bf16 runs: bf16 frozen weights, as the
replicated engines cast the model); buffers keep theirs (the NF4 scales stay fp32).
Communication: an all-gather of N·s bytes per gather of the unit (twice per micro-batch, forward
and backward, as the trainable part); nothing is reduced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ltk.models.init import make_real, materialized
from ltk.parallel.cost import shard_numel
from ltk.parallel.dist import Comm

ALIGN = 16  # bytes: every tensor starts at a multiple, so its slice views as any dtype up to 16 bytes wide


@dataclass
class Frozen:
    """One frozen tensor: `name` in the model, `module._parameters[attr]` or `module._buffers[attr]`."""
    name: str
    module: nn.Module
    attr: str
    is_param: bool
    tensor: torch.Tensor
    dtype: torch.dtype


def frozen_tensors(model: nn.Module, trainable: set[int], compute_dtype: torch.dtype) -> list[Frozen]:
    """The model's frozen tensors, each once (a tied parameter under its first name): parameters not
    in `trainable` (ids), and the buffers of NF4Linear modules (ltk/kernels/nf4.py)."""
    from ltk.kernels.nf4 import NF4Linear

    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        pre = mod_name + "." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is None or id(p) in trainable or id(p) in seen:
                continue
            seen.add(id(p))
            dtype = compute_dtype if p.is_floating_point() else p.dtype
            out.append(Frozen(pre + attr, mod, attr, True, p, dtype))
        if isinstance(mod, NF4Linear):
            for attr, b in mod._buffers.items():
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    out.append(Frozen(pre + attr, mod, attr, False, b, b.dtype))
    return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)  # (numel · element_size,)


class FrozenBytes:
    """The frozen tensors of one unit as one byte vector sharded over `comm` (module docstring)."""

    def __init__(self, entries: list[Frozen], comm: Comm, device: torch.device):
        self.entries, self.comm = entries, comm
        self.nbytes = [e.tensor.numel() * torch.empty((), dtype=e.dtype).element_size() for e in entries]
        self.offsets, off = [], 0
        for n in self.nbytes:
            self.offsets.append(off)
            off += -(-n // ALIGN) * ALIGN
        self.numel = off
        self.shard_bytes = shard_numel(max(off, 1), comm.size)  # s
        self.padded = self.shard_bytes * comm.size  # N·s
        lo, hi = comm.rank * self.shard_bytes, (comm.rank + 1) * self.shard_bytes
        self.shard = torch.zeros(self.shard_bytes, dtype=torch.uint8, device=device)
        for e, o, n in zip(entries, self.offsets, self.nbytes):
            a, b = max(o, lo), min(o + n, hi)
            if a < b:  # one tensor at a time: its value (computed if on meta), this rank's bytes kept
                value = materialized(e.tensor, device).to(device=device, dtype=e.dtype)
                self.shard[a - lo:b - lo] = _as_bytes(value)[a - o:b - o]
                del value
        self.full = torch.empty(self.padded, dtype=torch.uint8, device=device)
        for e, o, n in zip(entries, self.offsets, self.nbytes):  # the tensors become views of `full`
            view = self.full[o:o + n].view(e.dtype).view(e.tensor.shape)
            if e.is_param:
                make_real(e.tensor, view)
            else:
                e.module._buffers[e.attr] = view
        self.free()

    def gather(self):
        """Allocate `full` and all-gather the shards into it; returns the handle (None: done)."""
        self.full.untyped_storage().resize_(self.padded)
        return self.comm.all_gather(self.full, self.shard, async_op=True)

    def free(self) -> None:
        self.full.untyped_storage().resize_(0)

    def values(self) -> dict[str, torch.Tensor]:
        """name -> a whole copy of every frozen tensor (a collective: one all-gather)."""
        was = self.full.untyped_storage().nbytes() > 0
        if not was:
            handle = self.gather()
            if handle is not None:
                handle.wait()
        out = {e.name: self.full[o:o + n].view(e.dtype).view(e.tensor.shape).clone()
               for e, o, n in zip(self.entries, self.offsets, self.nbytes)}
        if not was:
            self.free()
        return out
