"""What the machine could do at best: datasheet peaks, and a quick measurement of our own.

A benchmark number means little against a baseline alone ("1.3x faster than eager") and
much more against the physical limit ("62% of the HBM bandwidth"): the limit says how much
is left to win. Which limit depends on the op's arithmetic intensity I = FLOPs / bytes moved
(the roofline model, Williams, Waterman & Patterson, CACM 2009):

    attainable FLOP/s = min(peak FLOP/s, I · peak bandwidth)

so a matmul-heavy op (large I) is judged by % of peak FLOP/s, and an elementwise or
normalization op (I of a few FLOPs per byte) by % of peak bandwidth. For training as a whole
the FLOP/s ratio is called MFU, model FLOPs utilization (PaLM, Chowdhery et al. 2022, app. B).

The datasheet table itself lives in ltk/training/hardware.py, because the trainer needs it
too (MFU in its progress bar) and data flows from bench to training, never back.
"""
from __future__ import annotations

from functools import partial

import torch

from ltk.bench.harness import environment, resolve_device, time_fn
from ltk.training.hardware import DATASHEET_PEAKS, Peak, peak_for  # noqa: F401  (re-exported)


def pct_of_peak(achieved: float | None, peak: float | None) -> float | None:
    """100 · achieved / peak, or None when either is unknown."""
    if achieved is None or not peak:
        return None
    return 100.0 * achieved / peak


def measure_peaks(
    device: str | torch.device = "auto",
    *,
    copy_mib: int | None = None,
    matmul_n: int | None = None,
    min_time: float | None = None,
) -> dict:
    """Measure copy bandwidth and matmul rate on `device`, beside the datasheet peak.

    Copy: `dst.copy_(src)` of a tensor much larger than any cache, so every byte comes from
    and goes to main memory; it reads and writes each byte once, so bandwidth =
    2 · size / time. Matmul: an n x n by n x n product costs 2n³ FLOPs (n³ multiply-adds);
    fp32 on a CPU, bf16 on CUDA (the tensor-core rate the datasheet quotes).
    Defaults take a second or two on a CPU; pass smaller sizes for a quick check.
    """
    device = resolve_device(device)
    cuda = device.type == "cuda"
    copy_mib = copy_mib or (2048 if cuda else 256)
    matmul_n = matmul_n or (8192 if cuda else 1024)
    min_time = min_time if min_time is not None else (0.5 if cuda else 0.6)
    dtype = torch.bfloat16 if cuda else torch.float32

    src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    # a partial, not a closure: the `del` below then frees the buffers without a closure naming them
    t_copy = time_fn(partial(dst.copy_, src), device=device, warmup=0.05, min_time=min_time)
    copy_gbps = 2 * src.numel() * src.element_size() / (t_copy.median_ms * 1e-3) / 1e9
    del src, dst

    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    t_mm = time_fn(lambda: a @ b, device=device, warmup=0.05, min_time=min_time)
    matmul_tflops = 2 * matmul_n**3 / (t_mm.median_ms * 1e-3) / 1e12

    env = environment(device)
    peak = peak_for(env["device"]) if cuda else None
    return {
        "device": env["device"],
        "threads": None if cuda else env["torch_threads"],
        "copy_mib": copy_mib,
        "copy_gbps": copy_gbps,
        "matmul_n": matmul_n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": matmul_tflops,
        "datasheet": None if peak is None else peak.name,
        "datasheet_bf16_tflops": None if peak is None else peak.bf16_tflops,
        "datasheet_hbm_gbps": None if peak is None else peak.hbm_gbps,
        "copy_pct_of_datasheet": pct_of_peak(copy_gbps, peak and peak.hbm_gbps),
        "matmul_pct_of_datasheet": pct_of_peak(matmul_tflops, peak and peak.bf16_tflops),
    }
