"""Peak rates of the accelerators this lab reports against, so every measured figure can
be shown as a fraction of what the machine can do (MFU: model FLOPs utilization, PaLM,
Chowdhery et al. 2022, appendix B).

Dense (no 2:4 sparsity) tensor-core rates and HBM bandwidth from NVIDIA's datasheets. The
trainer uses this for MFU; bench/ uses it for % of peak. CPUs have no entry: their peak
depends on the SKU, clock and vector units, so `bench --measure-peaks` measures it instead.
"""
from __future__ import annotations

import torch

# name fragment -> (bf16/fp16 dense FLOP/s, tf32 dense FLOP/s, HBM bytes/s); most specific first
DEVICE_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 494e12, 4.8e12),  # H200 SXM datasheet
    "H100 PCIe": (756e12, 378e12, 2.0e12),  # H100 PCIe datasheet
    "H100": (989e12, 494e12, 3.35e12),  # H100 SXM5 datasheet
    "A100-SXM4-80GB": (312e12, 156e12, 2.039e12),  # A100 80GB SXM datasheet
    "A100-SXM4-40GB": (312e12, 156e12, 1.555e12),
    "A100": (312e12, 156e12, 1.555e12),  # A100 40GB PCIe / SXM
}


def device_peaks(name: str) -> tuple[float, float, float] | None:
    """(bf16 FLOP/s, tf32 FLOP/s, bytes/s) for a device name like "NVIDIA H100 80GB HBM3"."""
    for key, peaks in DEVICE_PEAKS.items():
        if key.lower() in name.lower():
            return peaks
    return None


def peak_flops(device: torch.device, dtype: str = "bf16") -> float | None:
    """The matmul peak a run on `device` in `dtype` can reach, or None when unknown."""
    if device.type != "cuda":
        return None
    peaks = device_peaks(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    return peaks[1] if dtype == "fp32" else peaks[0]
