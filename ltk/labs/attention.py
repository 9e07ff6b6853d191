"""Lab `attention`: how do time and peak memory grow with sequence length for naive
attention, SDPA and a tiled online-softmax attention, and what does the cost model predict?

    ltk lab run attention --quick     # a CPU: B=1, H=4, D=64, T = 256 … 4096, fp32 (15-30 s)
    ltk lab run attention             # a GPU: B=1, H=16, D=128, T = 1k … 32k, bf16, + ours, flash-attn

(Each preset runs on the GPU when there is one, in bf16; on a CPU always in fp32.)

Attention, O = softmax(Q Kᵀ / √D) V, costs 4·T·S·D FLOPs per head whatever the method; what
differs is memory. The naive way materializes the (T, S) scores and probabilities, so its
memory grows as T² (S = T here). The tiled way (FlashAttention, Dao et al. 2022, Algorithm 1)
never holds more than a (T, C) block of scores: it walks the keys in chunks of C, keeping for
every query a running max m, a running sum l and an output accumulator, and its memory grows
as T. `chunked_attention` below is that idea in plain PyTorch (forward only, which is enough
for the memory story). SDPA (and, on a GPU, our Triton kernel and flash-attn) do it fused.

The lab measures, for each method and T, the forward's time and its peak memory, and puts
the cost model beside each number:

  memory  naive     B·H·(2·T·S + T·D)·elem        scores and probabilities, plus the output
          chunked   B·H·(T·C + 3·T·D + 4·T)·elem  one score block, q·scale, the accumulator,
                                                  the block's P·V, four per-row statistics
          fused     B·H·T·D·elem + 4·B·H·T        the output and the fp32 log-sum-exp
  time    max(FLOPs / matmul rate, bytes / copy bandwidth), the roofline, with the rates
          measured on this machine (bench.peaks.measure_peaks) and the FLOPs and fused bytes
          from kernels.attention's cost model; naive and chunked move the T×S scores through
          memory 4 times (write S, read S, write P, read P): 4·B·H·T·S·elem more bytes.

How memory is measured. On CUDA: the caching allocator's high-water mark during one call,
above what was allocated before it (torch.cuda.max_memory_allocated). On a CPU PyTorch keeps
no allocator statistics, and `tracemalloc` sees only Python's own allocator, not the C++
one that tensors come from. So we measure what the operating system sees: the peak resident
set size (VmHWM in /proc/self/status) during one call, minus the resident size just before
it. Linux lets a process reset its own peak (writing 5 to /proc/self/clear_refs), and glibc's
malloc_trim(0) first hands freed memory back, so the previous call's memory is not counted.
This counts every byte the call touched, including the threads' scratch buffers; it is
median-of-3 and a few hundred KiB noisy, which matters only at small T. Where the peak
cannot be reset (not Linux), memory is left blank and only the prediction is shown.
"""
from __future__ import annotations

import ctypes
import math
import os
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ltk.bench.attention import eager_attention, eager_bytes
from ltk.bench.harness import resolve_device, time_fn
from ltk.bench.peaks import measure_peaks
from ltk.bench.sweep import available_bytes, cuda_peak_mb, failure, is_oom, release_memory
from ltk.labs.registry import Lab
from ltk.labs.report import Report
from ltk.training.progress import Steps, progress, ticking

QUESTION = ("How do time and peak memory grow with sequence length for naive attention, SDPA and a tiled "
            "online-softmax attention — and what does the cost model predict?")


@dataclass(frozen=True)
class Sizes:
    batch: int
    heads: int
    head_dim: int
    seq_lens: tuple[int, ...]
    chunk: int  # C, keys per block of chunked_attention
    dtype: str  # auto (bf16 on CUDA, fp32 on a CPU) | bf16 | fp32
    min_time: float  # timed seconds per point


QUICK = Sizes(batch=1, heads=4, head_dim=64, seq_lens=(256, 512, 1024, 2048, 4096), chunk=128, dtype="auto",
              min_time=0.2)
FULL_GPU = Sizes(batch=1, heads=16, head_dim=128, seq_lens=(1024, 2048, 4096, 8192, 16384, 32768), chunk=128,
                 dtype="auto", min_time=0.2)
FULL_CPU = Sizes(batch=1, heads=4, head_dim=64, seq_lens=(256, 512, 1024, 2048, 4096, 8192), chunk=128,
                 dtype="auto", min_time=0.5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------
# The tiled online-softmax attention, in plain PyTorch
# ---------------------------------------------------------------------------------------

def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int = 128,
                      causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v without ever holding more than a (T, chunk) block of
    scores: online softmax (Milakov & Gimelshein 2018, arXiv 1805.02867) over key blocks, the
    loop of FlashAttention's Algorithm 1 (Dao et al. 2022, arXiv 2205.14135) with all queries
    in one block. Forward only; q (B, H, T, D), k and v (B, H, S, D).

    For one query with scores s_1 … s_S, softmax is shift-invariant, so for any m
        o = Σ_j e^(s_j − m) v_j / Σ_j e^(s_j − m),
    and m = max_j s_j keeps every exponent ≤ 0 (no overflow). Walking the keys in blocks, keep
        m = the max of the scores seen so far
        l = Σ_seen e^(s_j − m)           a = Σ_seen e^(s_j − m) v_j
    A new block with scores s_j raises the max to m' = max(m, max_j s_j); the old sums were
    taken relative to m, so they are rescaled by α = e^(m − m') before the block's terms join:
        l ← α·l + Σ_block e^(s_j − m')    a ← α·a + Σ_block e^(s_j − m') v_j
    After the last block o = a / l: exactly softmax(s) V in exact arithmetic, with memory
    O(T·chunk) for the block instead of O(T·S).

    causal: query i sees keys j ≤ i + (S − T) (bottom-right aligned, as kernels.attention).
    A query that has seen no visible key yet has m = −∞; its shift is taken as 0 (α = 0,
    e^(−∞) = 0) so nothing becomes NaN; a query with no visible key at all gets 0.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qs = q * scale  # (B, H, T, D)
    m = torch.full((B, H, T, 1), float("-inf"), dtype=q.dtype, device=q.device)  # running max
    l = torch.zeros((B, H, T, 1), dtype=q.dtype, device=q.device)  # running sum of e^(s − m)
    acc = torch.zeros_like(q)  # (B, H, T, D), running Σ e^(s − m) v
    rows = torch.arange(T, device=q.device)[:, None] + (S - T)  # (T, 1): last key each query sees
    for j0 in range(0, S, chunk):
        kj, vj = k[:, :, j0:j0 + chunk], v[:, :, j0:j0 + chunk]  # (B, H, c, D), c ≤ chunk
        s = qs @ kj.transpose(-2, -1)  # (B, H, T, c): the only score block alive
        if causal:
            cols = torch.arange(j0, j0 + kj.shape[2], device=q.device)[None, :]  # (1, c)
            s.masked_fill_(cols > rows, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B, H, T, 1)
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # no −∞ − (−∞)
        p = s.sub_(shift).exp_()  # e^(s − m'), in place: reuses the block's memory
        alpha = torch.exp(m - shift)  # rescales the old sums; 0 when nothing was seen yet
        l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
        acc.mul_(alpha).add_(p @ vj)  # (B, H, T, D)
        m = m_new
        del s, p  # free the block now, or it would still be alive while the next one is computed
    return acc / torch.where(l == 0, torch.ones_like(l), l)  # (B, H, T, D); 0 where no key was visible


def check_chunked(device: str | torch.device = "cpu") -> dict:
    """chunked_attention against naive attention in float64, several chunk sizes (dividing
    S or not), causal and not, T < S and T == S; returns the largest error seen. The lab
    refuses to run when it exceeds 1e-5: a wrong tiled softmax would make its numbers moot."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for T, S in ((37, 37), (64, 100)):
        q = torch.randn(2, 3, T, 16, generator=gen, dtype=torch.float64).to(device)
        k, v = (torch.randn(2, 3, S, 16, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
        for causal in (False, True):
            ref = naive_attention(q, k, v, causal=causal)
            for chunk in (1, 7, 16, S, S + 5):
                err = (chunked_attention(q, k, v, chunk=chunk, causal=causal) - ref).abs().max().item()
                worst = max(worst, err)
    if not worst <= 1e-5:
        raise RuntimeError(f"chunked_attention differs from naive attention by {worst:.3g} in float64")
    return {"max_abs_err_float64": worst, "tol": 1e-5}


def naive_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The textbook version, materializing the (T, S) scores: bench.attention's eager
    function for T == S; for T ≠ S with the same bottom-right causal mask as chunked."""
    if not causal or q.shape[2] == k.shape[2]:
        return eager_attention(q, k, v, causal, scale)
    T, S = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, S)
    hidden = torch.arange(S, device=q.device)[None, :] > torch.arange(T, device=q.device)[:, None] + (S - T)
    return torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1) @ v


# ---------------------------------------------------------------------------------------
# The cost model
# ---------------------------------------------------------------------------------------

def predicted_bytes(method: str, B: int, H: int, T: int, S: int, D: int, C: int, elem: int) -> int:
    """Peak memory one forward call allocates (inputs not counted), in bytes: see the module
    docstring. Naive grows as T·S, chunked and fused as T (for fixed C and D)."""
    if method == "naive":
        return B * H * (2 * T * S + T * D) * elem
    if method == "chunked":
        return B * H * (T * min(C, S) + 3 * T * D + 4 * T) * elem
    return B * H * T * D * elem + 4 * B * H * T  # fused: sdpa, ours, flash-attn


def predicted_ms(method: str, B: int, H: int, T: int, S: int, D: int, elem: int, peaks: dict) -> float:
    """The roofline time: max(FLOPs / matmul rate, bytes / copy bandwidth), rates measured.
    Fused kernels move Q, K, V, O once (kernels.attention.bytes_moved); naive and chunked
    also write and read the scores and the probabilities: 4·B·H·T·S·elem more bytes."""
    from ltk.kernels.attention import bytes_moved, flops

    nbytes = bytes_moved(B, H, H, T, S, D, dtype_bytes=elem)
    if method in ("naive", "chunked"):
        nbytes += 4 * B * H * T * S * elem
    seconds = max(flops(B, H, T, S, D) / (peaks["matmul_tflops"] * 1e12), nbytes / (peaks["copy_gbps"] * 1e9))
    return seconds * 1e3


# ---------------------------------------------------------------------------------------
# Measuring peak memory of one call
# ---------------------------------------------------------------------------------------

class RssPeak:
    """Peak resident memory of one call on a CPU (see the module docstring): reset the
    kernel's high-water mark, read the resident size, call, read the high-water mark."""

    def __init__(self):
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.available = self._reset()

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # kB
        raise OSError(f"{key} not in /proc/self/status")

    def _reset(self) -> bool:
        try:
            if self._libc is not None:
                self._libc.malloc_trim(0)  # hand freed heap memory back, so it is not "resident"
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
            self._status("VmHWM:")
            return True
        except OSError:
            return False

    def measure(self, fn, repeats: int = 3) -> float | None:
        """Median over `repeats` calls of (peak RSS during the call − RSS before it), MiB."""
        if not self.available:
            return None
        deltas = []
        for _ in range(repeats):
            self._reset()
            before = self._status("VmRSS:")
            out = fn()
            deltas.append(self._status("VmHWM:") - before)
            del out
        return statistics.median(deltas) / 2**20


# ---------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------

def methods(device: torch.device) -> tuple[dict, dict]:
    """({name: f(q, k, v, chunk)}, {name: why it is skipped}) for this device."""
    fns = {
        "naive": lambda q, k, v, C: eager_attention(q, k, v),
        "sdpa": lambda q, k, v, C: F.scaled_dot_product_attention(q, k, v),
        "chunked": lambda q, k, v, C: chunked_attention(q, k, v, chunk=C),
    }
    skipped = {}
    if device.type == "cuda":
        try:
            from ltk.kernels.attention import attention

            fns["ours"] = lambda q, k, v, C: attention(q, k, v, backend="triton")
        except ImportError as e:
            skipped["ours"] = f"ltk.kernels.attention cannot be imported: {e}"
        try:
            from flash_attn import flash_attn_func

            # flash-attn takes and returns (B, T, H, D): transposes are views (head dim stays unit-stride)
            fns["flash-attn"] = lambda q, k, v, C: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2)).transpose(1, 2)
        except ImportError:
            skipped["flash-attn"] = "flash-attn not installed"
    else:
        skipped["ours"] = "needs CUDA: the Triton interpreter is for correctness, not timing"
        skipped["flash-attn"] = "needs CUDA"
    return fns, skipped


def sweep(sizes: Sizes, device: torch.device, peaks: dict) -> tuple[list[dict], dict]:
    """One record per (T, method): time, measured and predicted memory and time, and the
    largest difference of the output from naive attention's (where naive ran)."""
    fns, skipped = methods(device)
    dtype = DTYPES[sizes.dtype]
    elem = dtype.itemsize
    B, H, D, C = sizes.batch, sizes.heads, sizes.head_dim, sizes.chunk
    rss = RssPeak() if device.type == "cpu" else None
    records = []
    bar = progress(total=len(sizes.seq_lens) * len(fns), desc="attention lab: timing", unit="point")
    for T in sizes.seq_lens:
        gen = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, H, T, D, generator=gen).to(device, dtype) for _ in range(3))
        ref = None
        for name, f in ticking(fns.items(), bar):
            rec = {"T": T, "method": name, "predicted_mib": predicted_bytes(name, B, H, T, T, D, C, elem) / 2**20,
                   "predicted_ms": predicted_ms(name, B, H, T, T, D, elem, peaks)}
            free = available_bytes(device)
            if name == "naive" and free is not None and eager_bytes(B, H, T, T, elem, "fwd") > 0.8 * free:
                records.append({**rec, "skipped": f"the T×S scores would need "
                                f"{eager_bytes(B, H, T, T, elem, 'fwd') / 2**30:.1f} GiB"})
                continue

            def call(f=f):
                with torch.no_grad():
                    # q, k, v: this T's inputs, deleted after the loop over methods
                    return f(q, k, v, C)  # noqa: F821 - pyflakes reads the later `del q, k, v` as undefining them

            try:
                t = time_fn(call, device=device, warmup=0.05, min_time=sizes.min_time)
                mem = cuda_peak_mb(call, device) if device.type == "cuda" else rss.measure(call)
                out = call()
            except Exception as e:  # noqa: BLE001 - one method's failure is a result, not the end of the lab
                if not is_oom(e) and name in ("naive", "sdpa", "chunked"):
                    raise
                records.append({**rec, "skipped": "out of memory" if is_oom(e) else failure(e)})
                release_memory(device, collect=True)
                continue
            if name == "naive":
                ref = out.float()
            err = (out.float() - ref).abs().max().item() if ref is not None else None
            records.append({**rec, "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                            "peak_mib": mem, "max_abs_diff_vs_naive": err})
            del out
            release_memory(device)
        del q, k, v, ref
        release_memory(device)
    bar.close()
    return records, skipped


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log y against log x: 2 for y ∝ x², 1 for y ∝ x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def slopes(records: list[dict]) -> dict:
    """{method: {quantity: slope}} of the measured and predicted time and memory against T,
    over the largest half of the sweep (small sizes are dominated by fixed costs)."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == name and "median_ms" in r]
        rs = rs[(len(rs) - 1) // 2:]  # the larger half, middle point included
        out[name] = {key: loglog_slope([(r["T"], r.get(key)) for r in rs if r.get(key) is not None])
                     for key in ("median_ms", "peak_mib", "predicted_ms", "predicted_mib")}
    return out


def _plot(records: list[dict], key: str, pred_key: str, ylabel: str, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, name in enumerate(dict.fromkeys(r["method"] for r in records)):
        rs = [r for r in records if r["method"] == name]
        done = [r for r in rs if r.get(key) is not None]
        if done:
            ax.plot([r["T"] for r in done], [r[key] for r in done], "o-", color=f"C{i}", label=f"{name} (measured)")
        ax.plot([r["T"] for r in rs], [r[pred_key] for r in rs], ":", color=f"C{i}", label=f"{name} (predicted)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="sequence length T (= S)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool) -> Path:
    device = resolve_device("auto")
    sizes = QUICK if quick else (FULL_GPU if device.type == "cuda" else FULL_CPU)
    # auto: bf16 on a GPU (what training uses, and all flash-attn takes); always fp32 on a CPU,
    # whose bf16 matmuls are emulated on most models
    if sizes.dtype == "auto" or device.type == "cpu":
        sizes = replace(sizes, dtype="bf16" if device.type == "cuda" else "fp32")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other processes' load, before ours
    steps = Steps("attention lab", 3)
    steps.begin("checking chunked attention against naive")
    check = check_chunked(device)
    steps.begin("measuring the machine's matmul rate and bandwidth")
    small = dict(copy_mib=64, matmul_n=1024, min_time=0.2) if device.type == "cpu" else {}
    peaks = measure_peaks(device, **small)
    steps.begin("timing every method at every length")
    records, skipped = sweep(sizes, device, peaks)
    steps.close()
    fits = slopes(records)

    command = "ltk lab run attention" + (" --quick" if quick else "")
    rep = Report("Lab: attention's time and memory against sequence length", QUESTION, command)
    B, H, D, C = sizes.batch, sizes.heads, sizes.head_dim, sizes.chunk
    rep.text(f"Forward pass, B={B}, H={H}, D={D}, S = T, {sizes.dtype}, on {device.type}; chunked "
             f"attention walks the keys in blocks of C={C}. Predicted memory and time come from the cost "
             "model in the notes below; measured rates of this machine: "
             f"matmul {peaks['matmul_tflops'] * 1e3:.1f} GFLOP/s ({peaks['matmul_dtype']}), "
             f"copy {peaks['copy_gbps']:.1f} GB/s.")
    if device.type == "cpu" and load is not None and load >= (os.cpu_count() or 1):
        rep.text(f"**Warning.** Other processes were using the CPU when this ran (1-minute load average "
                 f"{load:.1f} on {os.cpu_count()} cores): times are inflated and noisy, most of all for methods "
                 "made of many small ops (chunked), whose threads wait for each other at every op; the measured "
                 "peak rates are low too, so a time can even fall under its roofline. Memory is unaffected.")
    table = []
    for r in records:
        if "skipped" in r:
            table.append([r["T"], r["method"], "skipped: " + r["skipped"], f"{r['predicted_ms']:.3g}", "",
                          f"{r['predicted_mib']:.3g}", "", ""])
            continue
        table.append([r["T"], r["method"], f"{r['median_ms']:.3g} [{r['p20_ms']:.3g}, {r['p80_ms']:.3g}]",
                      f"{r['predicted_ms']:.3g}",
                      "" if r["peak_mib"] is None else f"{r['peak_mib']:.3g}", f"{r['predicted_mib']:.3g}",
                      "" if r["peak_mib"] is None else f"{r['peak_mib'] / r['predicted_mib']:.2f}",
                      "" if r["max_abs_diff_vs_naive"] is None else f"{r['max_abs_diff_vs_naive']:.1e}"])
    rep.table(["T", "method", "time ms [p20, p80]", "roofline ms", "peak MiB", "predicted MiB",
               "measured / predicted", "max |Δ| vs naive"], table,
              "Each point: the median time of the forward, the roofline prediction, the peak memory of one call "
              "above the inputs (measured and predicted), and the largest difference from naive attention's output.")
    rep.table(["method", "time slope", "memory slope", "predicted memory slope"],
              [[m, _fmt_slope(s["median_ms"]), _fmt_slope(s["peak_mib"]), _fmt_slope(s["predicted_mib"])]
               for m, s in fits.items()],
              "Growth exponents: the slope of log(y) against log(T) over the larger half of the sweep "
              "(2 means y ∝ T², 1 means y ∝ T).")
    rep.plot("time", _plot(records, "median_ms", "predicted_ms", "forward time (ms)",
                           "time vs T (dotted: roofline)"), "forward time against T, log-log")
    rep.plot("memory", _plot(records, "peak_mib", "predicted_mib", "peak memory of one call (MiB)",
                             "memory vs T (dotted: cost model)"), "peak memory against T, log-log")
    rep.text(_explanation(records, fits, sizes, skipped, device, check))
    rep.results.update({"sizes": asdict(sizes), "device": str(device), "peaks": peaks, "check": check,
                        "load_avg_1m_before": load, "cpu_cores": os.cpu_count(),
                        "records": records, "slopes": fits, "skipped": skipped,
                        "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                        "peak RSS per call (/proc/self/clear_refs reset, malloc_trim), median of 3"})
    path = rep.write(out)
    print(f"\nreport: {path}")
    for m, s in fits.items():
        print(f"{m:10s} time ∝ T^{_fmt_slope(s['median_ms'])}   memory ∝ T^{_fmt_slope(s['peak_mib'])} "
              f"(predicted T^{_fmt_slope(s['predicted_mib'])})")
    return path


def _fmt_slope(s: float | None) -> str:
    return "" if s is None else f"{s:.2f}"


def _explanation(records, fits, sizes, skipped, device, check) -> str:
    """The few sentences under the tables, written from the numbers of this run, at the
    largest T where both naive and chunked attention ran."""
    ran = {(r["T"], r["method"]) for r in records if "median_ms" in r}
    both = [T for T, m in ran if m == "naive" and (T, "chunked") in ran]
    largest = max(both) if both else max(r["T"] for r in records)
    at = {r["method"]: r for r in records if r["T"] == largest and "median_ms" in r}
    elem = DTYPES[sizes.dtype].itemsize
    lines = ["## What it shows", ""]
    if "naive" in at and "chunked" in at:
        n, c = at["naive"], at["chunked"]
        if n["peak_mib"] is not None:
            ratios = ", ".join(f"{m} {r['peak_mib'] / r['predicted_mib']:.2f}" for m, r in at.items())
            mem = (f" At T={largest} naive attention needed {n['peak_mib']:.0f} MiB for one call and the chunked "
                   f"version {c['peak_mib']:.1f} MiB, {n['peak_mib'] / max(c['peak_mib'], 1e-9):.0f}× less. "
                   f"Measured over predicted at T={largest}: {ratios}; where a ratio is well above 1, buffers "
                   "of fixed size (the fused kernel's per-thread blocks, allocator rounding) are not in the "
                   "model, and they flatten the measured slope at small sizes.")
        else:
            mem = " (Memory could not be measured here; the predictions are in the table.)"
        lines.append(
            f"**Memory.** Naive attention holds the T×S scores and probabilities, so its memory grows as T² "
            f"(measured slope {_fmt_slope(fits['naive']['peak_mib'])}, predicted "
            f"{_fmt_slope(fits['naive']['predicted_mib'])}). The chunked online softmax holds one T×C block, "
            f"the accumulator and per-row statistics, so its memory grows as T (measured slope "
            f"{_fmt_slope(fits['chunked']['peak_mib'])}). A fused kernel holds even less: the output and "
            f"the per-row log-sum-exp (SDPA's measured slope {_fmt_slope(fits.get('sdpa', {}).get('peak_mib'))})."
            + mem)
        lines.append("")
        block_mib = sizes.batch * sizes.heads * largest * sizes.chunk * elem / 2**20
        scores_mib = sizes.batch * sizes.heads * largest * largest * elem / 2**20
        faster = c["median_ms"] < n["median_ms"]
        roof = ", ".join(f"{m} {r['median_ms'] / r['predicted_ms']:.1f}×" for m, r in at.items())
        lines.append(
            "**Time.** Every method does the same 4·T·S·D FLOPs per head, so every time grows about as T² "
            "(slopes " + ", ".join(f"{m} {_fmt_slope(s['median_ms'])}" for m, s in fits.items()) + "). What "
            f"differs is the distance from the roofline (measured over roofline at T={largest}: {roof}). "
            f"Naive attention writes and reads the scores and the probabilities through memory, "
            f"{scores_mib:.0f} MiB each at T={largest}, and makes a separate softmax pass over them. The chunked "
            f"version moves as many bytes, but in blocks of {block_mib:.1f} MiB"
            + (", small enough to stay in this machine's caches, which is why it is faster than naive here."
               if faster else "; they still go out to memory and back, and its loop of small ops costs time, "
               "so here it saves memory and not time.")
            + " A fused kernel keeps each block in registers and on-chip memory and never writes it out: that is "
            "SDPA here, and flash-attn and our Triton kernel on a GPU.")
    lines.append("")
    lines.append(f"**Check.** chunked_attention equals naive attention in float64 to "
                 f"{check['max_abs_err_float64']:.1e} "
                 f"(tolerance {check['tol']:g}) over chunk sizes that divide S and that do not, causal and not; "
                 "the table's last column compares every method with naive attention in the sweep's dtype.")
    if skipped:
        lines.append("")
        lines.append("**Not run here:** " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".")
    lines += ["", "## How memory was measured", "",
              "On CUDA, the allocator's high-water mark during one call above what was allocated before it. "
              "On a CPU, PyTorch keeps no allocator statistics and tracemalloc sees only Python's allocator, "
              "so the lab resets the process's peak resident set size (Linux: /proc/self/clear_refs), "
              "calls once, and reads the new peak (VmHWM) minus the resident size before the call; "
              "median of 3 calls. It counts every page the call touched, threads' scratch included."]
    return "\n".join(lines)


LAB = Lab(name="attention", question=QUESTION, run=run, quick_minutes=0.25)
