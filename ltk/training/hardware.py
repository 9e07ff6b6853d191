"""Peak rates of the accelerators this lab reports against, so every measured figure can be
shown as a fraction of what the machine can do: % of peak FLOP/s for compute-bound work
(for training as a whole, MFU — model FLOPs utilization, PaLM, Chowdhery et al. 2022,
appendix B), % of peak bandwidth for memory-bound ops.

The table holds *dense* BF16 tensor-core rates: NVIDIA's datasheets print the rate "with
sparsity" (2:4 structured sparsity, which dense training does not use), twice the dense one,
and we halve it. TF32 (what fp32 matmuls use on these GPUs when allowed) runs at half the
BF16 rate on both Ampere and Hopper. Bandwidths are the HBM figures of the same datasheets.
CPUs have no entry: their peak varies with model, clock and vector units, so
`ltk bench NAME --measure-peaks` measures it instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float  # dense BF16 tensor-core rate, TFLOP/s (1e12)
    hbm_gbps: float  # memory bandwidth, GB/s (1e9 bytes/s)


# (tokens that must all appear in the device name, peak); the first match wins, so the
# more specific variants come first. Tokens match whole words, case-insensitively: "H200"
# must not match a "GH200" (a Grace-Hopper superchip with different memory).
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity,
# 3.35 TB/s; PCIe: 1,513, 2 TB/s; NVL: 1,671, 3.9 TB/s); NVIDIA H200 Tensor Core GPU
# datasheet (SXM: 1,979 with sparsity, 4.8 TB/s; NVL: 1,671, 4.8 TB/s); NVIDIA A100 Tensor
# Core GPU datasheet (BF16 312 dense / 624 with sparsity; 40GB: 1,555 GB/s; 80GB SXM:
# 2,039 GB/s; 80GB PCIe: 1,935 GB/s). CUDA reports an H100 SXM as "NVIDIA H100 80GB HBM3",
# an A100 as e.g. "NVIDIA A100-SXM4-80GB" or "NVIDIA A100 80GB PCIe".
DATASHEET_PEAKS: list[tuple[tuple[str, ...], Peak]] = [
    (("H200", "NVL"), Peak("NVIDIA H200 NVL", 835.5, 4800.0)),
    (("H200",), Peak("NVIDIA H200 SXM", 989.4, 4800.0)),
    (("H100", "NVL"), Peak("NVIDIA H100 NVL", 835.5, 3900.0)),
    (("H100", "PCIe"), Peak("NVIDIA H100 PCIe", 756.5, 2000.0)),
    (("H100",), Peak("NVIDIA H100 SXM", 989.4, 3350.0)),
    (("A100", "80GB", "PCIe"), Peak("NVIDIA A100 PCIe 80GB", 312.0, 1935.0)),
    (("A100", "80GB"), Peak("NVIDIA A100 SXM 80GB", 312.0, 2039.0)),
    (("A100",), Peak("NVIDIA A100 40GB", 312.0, 1555.0)),
]


def peak_for(device_name: str) -> Peak | None:
    """The datasheet peak of a device, from its name as torch reports it; None when the
    device is not in the table (every CPU: their peaks vary too much by model and clock)."""
    for tokens, peak in DATASHEET_PEAKS:
        if all(re.search(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", device_name, re.I)
               for t in tokens):
            return peak
    return None


def peak_flops(device: torch.device, dtype: str = "bf16") -> float | None:
    """The dense matmul peak (FLOP/s) a run on `device` computing in `dtype` can reach, or
    None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    peak = peak_for(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    rate = peak.bf16_tflops * 1e12
    return rate / 2 if dtype == "fp32" else rate  # fp32 matmuls run as TF32
