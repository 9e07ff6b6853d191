"""Where a run executes: device, precision, processes, and the random state to resume.

Mixed precision: on CUDA the default is bf16. bf16 means what `ltk plan` counts: the engines
keep the parameters and their gradients in bf16 and reduce them in bf16 (or in fp32 with
--parallel.reduce_dtype fp32), while AdamW updates an fp32 master copy (Micikevicius et al.
2018: small updates vanish in 16 bits; ltk/parallel/mixed.py, zero.py). The training forward
therefore runs without autocast: its weights are bf16 already, so its matmuls are too, and the
activations that cross tensor- and pipeline-parallel collectives are bf16 as the plan assumes;
the loss takes fp32 logits. Autocast (`Runtime.autocast`) stays for evaluation, whose model may
be an fp32 copy gathered from the masters. bf16 has fp32's exponent range, so no loss scaling
is needed; fp16 does need it: fp16 keeps fp32 parameters under fp16 autocast with a GradScaler
(the plain and torch-ddp paths). bf16 autocast works on a CPU too; the CPU default is fp32 so
that runs are bitwise reproducible.

Processes: under `torchrun` (WORLD_SIZE > 1) each process joins one process group —
NCCL on CUDA, gloo on CPU — and trains its own shard of every batch.
"""
from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    dtype: str  # "fp32" | "bf16" | "fp16": what the matmuls run in
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False  # we joined it, so we leave it (see `shutdown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> Callable[[], Any]:
        """The context evaluation runs in (fp16: training too; see the module docstring)."""
        if self.dtype == "fp32":
            return nullcontext
        dt = torch.bfloat16 if self.dtype == "bf16" else torch.float16
        return partial(torch.autocast, device_type=self.device.type, dtype=dt)

    def shutdown(self) -> None:
        """Leave the process group we joined. Exiting with it still open can abort a rank at
        interpreter shutdown (its communication threads are still running)."""
        if self.owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_process_group = False

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank. Through a Comm with its own counter, so a per-rank timeline
        (ltk/parallel/timeline.py) sees the wait while the strategies' byte counts stay theirs."""
        if self.world_size > 1:
            from ltk.parallel.dist import Comm, CommStats

            Comm(stats=CommStats()).all_reduce(t)
        return t


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--trainer.device {name}: CUDA is not available on this machine (use cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--trainer.device {name}: supported devices are cpu, cuda, cuda:N and auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--trainer.dtype {name!r}: choose auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--trainer.dtype fp16 needs CUDA (use fp32 or bf16 on a CPU)")
    return name


def setup_runtime(device: str, dtype: str) -> Runtime:
    """Join the process group if launched by torchrun, then pick device and precision."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    owns = world > 1 and not dist.is_initialized()
    if owns:  # the collective timeout: --dist-timeout, else torch's default (ltk/training/rendezvous.py)
        from ltk.training.rendezvous import dist_timeout

        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
    return Runtime(device=dev, dtype=resolve_dtype(dtype, dev), rank=rank, world_size=world, local_rank=local_rank,
                   owns_process_group=owns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Every random stream a training step can draw from (dropout, sampling, shuffles)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def capture_host_rng() -> dict[str, Any]:
    """Python's and NumPy's generators, as JSON (they are not tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(tensors: dict[str, Any], host: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        saved = list(tensors["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
    v, internal, gauss = host["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = host["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
