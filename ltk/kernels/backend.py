"""Which implementation runs an op: `torch` (the plain-PyTorch reference, any device) or
`triton` (our kernels: compiled on CUDA, or run by Triton's interpreter on a CPU when
TRITON_INTERPRET=1 was set before the kernels were imported).

    backend="auto"    triton when the inputs live on a CUDA device, torch elsewhere
    backend="torch"   always the reference
    backend="triton"  always our kernels; on a CPU only under the interpreter

A model picks one for all its ops with a single setting (`GPTConfig.backend`); every op
also takes `backend=` per call.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")

try:  # Triton ships for Linux; elsewhere only the torch backend exists
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_arch() -> int:
    """The current CUDA device's compute capability as one number (9.0 -> 90, 8.0 -> 80): what
    the autotuners' pruners read to pick a kernel's per-architecture candidate list. Without a
    CUDA device (the interpreter running the GPU launch path, in tests) Hopper's: 90."""
    if not torch.cuda.is_available():
        return 90
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn "auto" into a concrete backend for input `x`, and refuse a combination that
    cannot run with an error that says what to do instead."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package (Linux; pip install triton)")
        if not x.is_cuda and not interpreter_on():
            raise ValueError(
                f"backend='triton' got a tensor on {x.device}: Triton kernels run on CUDA, or on a CPU "
                "under the interpreter (set TRITON_INTERPRET=1 before importing kernels)"
            )
        if x.is_cuda and interpreter_on():
            raise ValueError("backend='triton' got a CUDA tensor while TRITON_INTERPRET=1 is set")
    return backend


def check_float(name: str, t: torch.Tensor, allowed=(torch.float16, torch.bfloat16, torch.float32)) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in allowed)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("inputs are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def output_buffer(shape, dtype: torch.dtype, device, poison: bool) -> torch.Tensor:
    """Every buffer a kernel writes comes from here. With `poison` (each kernel module's
    POISON_OUTPUTS: tests, the GPU check) it is filled with NaN before launch, so an element
    a kernel forgets to write fails the comparison instead of passing with stale memory."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
