"""The data-parallel engines behind one interface (`build_engine`), each over the dp axis of the
mesh: ours (ltk/parallel/ddp.py, zero.py, zero3.py), PyTorch's DistributedDataParallel, DeepSpeed
(ltk/parallel/deepspeed_engine.py), or the plain optimizer of one process. Their contract:
ltk/parallel/ddp.py. ParallelRun (ltk/parallel/strategy.py) builds one for each run.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.distributed as dist

from ltk.models.init import materialize
from ltk.parallel.dist import Comm
from ltk.parallel.mixed import MasterOptimizer, as_dtype, clip_, mixed_factory
from ltk.parallel.named_state import aliases, by_name_state, load_by_name_state, master_weights, param_names, unwrapped

DP_ENGINES = ("ddp", "naive-ddp", "zero1", "zero2", "zero3", "torch-ddp", "fsdp2", "torch-tp",
              "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")
TORCH_ENGINES = ("fsdp2", "torch-tp")  # DTensor parameters: ltk/parallel/fsdp2.py


class _Single:
    """One process (or tensor parallel without data parallelism): the plain optimizer."""

    def __init__(self, model, param_groups, optimizer_factory):
        self.module = model
        self.optimizer = optimizer_factory(param_groups)  # mixed precision: casts the model (mixed.py)
        self.names = param_names(model, self.optimizer)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> float:
        if isinstance(self.optimizer, MasterOptimizer):  # on the fp32 master gradients
            self.optimizer.prepare_grads()
            return clip_(self.optimizer.masters(), max_norm)
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm).item()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        sd = unwrapped(self.module).state_dict()  # tied weights stay one tensor under two names
        if isinstance(self.optimizer, MasterOptimizer):
            sd = master_weights(self.module, self.optimizer, sd)
            sd.update({k: sd[twin] for k, twin in aliases(unwrapped(self.module)).items()})
        return sd

    def optimizer_state_dict(self) -> dict:
        return by_name_state(self.optimizer, self.names)

    def load_optimizer_state_dict(self, sd: dict) -> None:
        load_by_name_state(self.optimizer, self.names, sd)


class _TorchDDP(_Single):
    """PyTorch's DistributedDataParallel behind the same interface (the reference engine): its
    forward and no_sync; gradients arrive averaged, so the rest is the plain optimizer's."""

    def __init__(self, model, param_groups, optimizer_factory, comm: Comm, device: torch.device):
        super().__init__(model, param_groups, optimizer_factory)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=comm.group)

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()


def build_engine(name: str, model, param_groups, optimizer_factory: Callable, comm: Comm, device: torch.device,
                 compute_dtype: str = "fp32", bucket_mb: float = 25.0, reduce_dtype: str | None = None,
                 micro_batch: int = 1, grad_clip: float = math.inf):
    """The data-parallel engine `name` over `comm` (its contract: ltk/parallel/ddp.py, zero.py).

    compute_dtype bf16: bf16 parameters and gradients, collectives in reduce_dtype (default: the
    gradients' dtype), an fp32 master of the weights the optimizer updates (ltk/parallel/mixed.py).
    micro_batch (rows per rank) and grad_clip configure DeepSpeed, which owns both
    (ltk/parallel/deepspeed_engine.py)."""
    reduce_dtype = reduce_dtype or compute_dtype
    replicated = mixed_factory(optimizer_factory, compute_dtype)  # the engines that keep whole weights
    if name != "zero3" or comm.size == 1:  # every other engine holds the whole model: make real what is on meta
        materialize(model, device)
    if name in ("none", "auto") or comm.size == 1 and name != "torch-ddp":
        return _Single(model, param_groups, replicated)
    if name == "ddp":
        from ltk.parallel.ddp import DDP

        return DDP(model, param_groups, replicated, comm, bucket_cap_mb=bucket_mb, reduce_dtype=reduce_dtype)
    if name == "naive-ddp":
        from ltk.parallel.ddp import NaiveDDP

        return NaiveDDP(model, param_groups, replicated, comm, reduce_dtype=reduce_dtype)
    if name in ("zero1", "zero2"):
        from ltk.parallel.zero import ZeroEngine

        return ZeroEngine(model, param_groups, optimizer_factory, comm, stage=int(name[-1]),
                          compute_dtype=compute_dtype, reduce_dtype=reduce_dtype, bucket_mb=bucket_mb)
    if name == "zero3":
        from ltk.parallel.zero3 import Zero3Engine

        return Zero3Engine(model, param_groups, optimizer_factory, comm, compute_dtype=compute_dtype,
                           reduce_dtype=reduce_dtype, device=device)
    if name == "torch-ddp":
        if as_dtype(reduce_dtype) != as_dtype(compute_dtype):
            raise ValueError("torch-ddp reduces gradients in their own dtype: --parallel.reduce_dtype needs "
                             "ddp, naive-ddp or a ZeRO engine")
        return _TorchDDP(model, param_groups, replicated, comm, device)
    if name.startswith("deepspeed-zero"):
        from ltk.parallel.deepspeed_engine import STAGES, DeepSpeedZero

        if comm.size != (dist.get_world_size() if dist.is_initialized() else 1):
            raise ValueError(f"{name} runs over every rank: it does not combine with --parallel.tp")
        return DeepSpeedZero(model, param_groups, optimizer_factory, stage=STAGES[name], micro_batch=micro_batch,
                             grad_clip=grad_clip, compute_dtype=compute_dtype,
                             reduce_dtype=None if reduce_dtype == compute_dtype else reduce_dtype, device=device)
    raise ValueError(f"unknown data-parallel strategy {name!r}; choose one of {', '.join(DP_ENGINES)}")
