"""attention: time and TFLOP/s of scaled dot-product attention, ours against PyTorch and
flash-attn, over sequence lengths, in the forward, backward and forward+backward modes.

    O = softmax(Q Kᵀ · scale + mask) V,   Q (B, H, T, D), K and V (B, H, S, D), here S = T

Providers:
  ours           kernels.attention.attention(backend="triton"): our tiled online-softmax
                 kernel (CUDA only: on a CPU the Triton interpreter runs it, which is for
                 correctness, never for timing)
  torch          eager matmul → softmax → matmul in the input dtype; it materializes the
                 B·H·T·S scores and probabilities (the same math as attention_reference)
  sdpa           torch.nn.functional.scaled_dot_product_attention (picks FlashAttention-2,
                 memory-efficient or math kernels on CUDA, a fused flash kernel on a CPU)
  torch.compile  the eager function above compiled by inductor (one compile per point)
  flash-attn     flash_attn.flash_attn_func, layout (B, T, H, D); where installed, CUDA only

FLOPs come from the kernels' cost model, `kernels.attention.flops`: 4·B·H·T·S·D forward (two
matmuls of 2·T·S·D each), 2.5× that backward (five matmuls, dQ, dK, dV, dP and the recomputed
S), halved when causal. The causal count is what an ideal kernel must do; eager attention
computes the full T×S square and masks it, so its causal TFLOP/s is half its real rate, and
that is the point: it does work it throws away. % of peak is against the device's dense
matmul peak (ltk/bench/peaks.py; TF32 for fp32), None on a CPU, whose peak we do not tabulate.

Timed regions (ltk/bench/sweep.py `timed_call`): fwd runs under no_grad; bwd times the backward
alone, re-walking one retained graph (as FlashAttention's benchmark does); fwd+bwd times both.
Peak memory is CUDA's allocator high-water mark during one timed call, above what was
allocated before it (inputs, and in bwd the forward's saved tensors, not counted). On a CPU it
is None: PyTorch keeps no CPU allocator statistics and a process's peak RSS is one number for
the whole sweep; the lab `ltk lab run attention --quick` measures CPU memory per point instead.
Each row's extra carries `scores_mib`, the size of one B·H·T·S tensor, what eager must hold.

A provider that cannot run is skipped with the reason (printed, and in `rows.skipped`):
flash-attn not installed, ours without CUDA, eager when its scores would not fit in free
memory, an out-of-memory error or a failed compile at one point (the sweep goes on).

    # CPU: T = 128 … 1024, B·T = 2048, H=8, D=64, fp32, causal and not, fwd and fwd+bwd (30-40 s)
    ltk bench attention
    # one GPU: T = 512 … 16k, B·T = 16k tokens, H=16, D=128, bf16, causal and not, all modes
    ltk bench attention --device cuda --plot attention.png
    ltk bench attention --device cuda --seq-lens 4k,16k --providers ours,sdpa,flash-attn --causal yes
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, environment, resolve_device
from ltk.bench.peaks import pct_of_peak
from ltk.bench.sweep import (
    DTYPES,
    MODES,
    Skip,
    SweepRows,
    available_bytes,
    measure_point,
    parse_choices,
    parse_dtype,
    parse_sizes,
    plot_sweep,
    print_skipped,
    release_memory,
)
from ltk.training.hardware import peak_flops
from ltk.training.progress import progress, ticking

PROVIDERS = ("ours", "torch", "sdpa", "torch.compile", "flash-attn")
BASELINE = "torch"
EAGER = ("torch", "torch.compile")  # the providers that materialize the T×S scores
NEEDS_CUDA = "ours needs CUDA: the Triton interpreter is for correctness, not timing"


@dataclass(frozen=True)
class Defaults:
    seq_lens: tuple[int, ...]
    tokens: int  # B·T kept about constant, so every point does similar work per token
    heads: int
    head_dim: int
    causal: tuple[bool, ...]
    modes: tuple[str, ...]


CUDA_DEFAULTS = Defaults((512, 1024, 2048, 4096, 8192, 16384), 16384, 16, 128, (False, True), MODES)
CPU_DEFAULTS = Defaults((128, 256, 512, 1024), 2048, 8, 64, (False, True), ("fwd", "fwd+bwd"))


def causal_mask(T: int, S: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, S) bool, True where a key is hidden: key j > query i (for T == S)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).triu(1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v in the inputs' dtype, the textbook way.

    q (B, H, T, D), k and v (B, H_kv, S, D) with H a multiple of H_kv (grouped-query heads are
    repeated). The causal mask is for T == S (query i sees keys j ≤ i); pass `mask` =
    causal_mask(T, S) to reuse one, as a model keeps it in a buffer, else it is built here.
    Memory: the scores and the probabilities are both (B, H, T, S), the whole cost that fused
    kernels avoid."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, S); scaling q costs T·D, not T·S
    if causal:
        s.masked_fill_(causal_mask(*s.shape[-2:], s.device) if mask is None else mask, float("-inf"))
    p = torch.softmax(s, dim=-1)  # (B, H, T, S)
    return p @ v  # (B, H, T, D)


def eager_bytes(B: int, H: int, T: int, S: int, elem: int, mode: str) -> int:
    """Peak bytes of the T×S tensors eager attention holds at once: the scores and the
    probabilities in the forward (2); in the backward the saved probabilities, dP = dO Vᵀ and
    dS = softmax'(dP) (3)."""
    return (2 if mode == "fwd" else 3) * B * H * T * S * elem


def _flash_attn():
    import flash_attn

    return flash_attn


def _ours_module():
    """The module ltk/kernels/attention.py (the package's attribute `kernels.attention` is the
    function of the same name)."""
    return importlib.import_module("ltk.kernels.attention")


def unavailable(provider: str, dev: torch.device, dtype: str) -> str | None:
    """Why `provider` cannot run at all on `dev` in `dtype`, or None when it can."""
    if provider == "ours":
        from ltk.kernels.backend import HAS_TRITON

        if not HAS_TRITON:
            return "ours needs the triton package"
        if dev.type != "cuda":
            return NEEDS_CUDA
        try:
            _ours_module()
        except ImportError as e:
            return f"ltk.kernels.attention cannot be imported: {e}"
    if provider == "flash-attn":
        try:
            _flash_attn()
        except ImportError:
            return "flash-attn not installed"
        if dev.type != "cuda":
            return "flash-attn needs CUDA"
        if dtype == "fp32":
            return "flash-attn supports fp16 and bf16 only"
    return None


def build(provider: str, q, k, v, causal: bool, scale: float):
    """(forward, inputs): a closure computing the provider's attention from `inputs`, fresh
    leaf tensors with requires_grad (copies of q, k, v, so providers never share gradients;
    flash-attn gets them in its (B, T, H, D) layout, the transpose done here, untimed)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if provider == "ours":
        attn = _ours_module().attention
        return (lambda: attn(q, k, v, causal=causal, softmax_scale=scale, backend="triton")), [q, k, v]
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal and provider in EAGER else None
    if provider == "torch":
        return (lambda: eager_attention(q, k, v, causal, scale, mask)), [q, k, v]
    if provider == "sdpa":
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)), [q, k, v]
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh, static-shape compile per point: no recompile limit, no dynamic shapes
        compiled = torch.compile(eager_attention, dynamic=False)
        return (lambda: compiled(q, k, v, causal, scale, mask)), [q, k, v]
    if provider == "flash-attn":
        fa = _flash_attn()
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))  # (B, T, H, D)
        return (lambda: fa.flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=causal)), [qt, kt, vt]
    raise ValueError(f"unknown provider {provider!r}")


def _causal_list(causal: str | bool, default: tuple[bool, ...]) -> tuple[bool, ...]:
    if isinstance(causal, bool):
        return (causal,)
    table = {"auto": default, "both": (False, True), "yes": (True,), "true": (True,), "no": (False,),
             "false": (False,)}
    if str(causal).lower() not in table:
        raise ValueError(f"causal must be one of auto, both, yes, no; got {causal!r}")
    return table[str(causal).lower()]


def run(*, seq_lens: str | None = None, batch: int | None = None, tokens: int | None = None,
        heads: int | None = None, head_dim: int | None = None, causal: str | bool = "auto",
        dtype: str = "auto", modes: str | None = None, providers: str = "all", min_time: float = 0.25,
        device: str = "auto", seed: int = 0, plot: str | None = None) -> SweepRows:
    """Time every (sequence length, causal, mode, provider) point; one Row each.

    None and "auto" take the device's defaults (CUDA_DEFAULTS or CPU_DEFAULTS). seq_lens:
    comma list ("512,1k,2k"). batch: fixed B; None keeps B·T ≈ `tokens`. causal: auto, both,
    yes, no (or a bool). modes, providers: comma lists, "all" for every provider.
    min_time: timed seconds per point. plot: write a PNG of TFLOP/s against T there."""
    dev = resolve_device(device)
    d = CUDA_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    T_list = parse_sizes(seq_lens) if seq_lens is not None else list(d.seq_lens)
    H, D = heads or d.heads, head_dim or d.head_dim
    dtype = parse_dtype(dtype, dev)
    mode_list = list(MODES) if modes == "all" else parse_choices(modes or ",".join(d.modes), MODES, "mode")
    wanted = list(PROVIDERS) if providers == "all" else parse_choices(providers, PROVIDERS, "provider")
    causals = _causal_list(causal, d.causal)
    attn_cost = _ours_module()  # the cost model (flops, bytes_moved) is shared by every provider

    rows = SweepRows()
    skip_all = {p: why for p in wanted if (why := unavailable(p, dev, dtype))}
    rows.skipped += [Skip(p, "*", why) for p, why in skip_all.items()]
    runnable = [p for p in wanted if p not in skip_all]
    env = environment(dev)  # read before the sweep: its load average is that of other processes
    peak = peak_flops(dev, dtype)
    elem = DTYPES[dtype].itemsize

    bar = progress(total=len(T_list) * len(causals) * len(mode_list) * len(runnable), desc="attention", unit="point")
    for T in T_list:
        B = batch or max(1, (tokens or d.tokens) // T)
        scale = 1.0 / math.sqrt(D)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dev, DTYPES[dtype]) for _ in range(3))
        for is_causal in causals:
            shape = f"B={B},H={H},T={T},D={D}" + (",causal" if is_causal else "")
            for mode in mode_list:
                point = f"{shape} {mode}"
                for p in ticking(runnable, bar):
                    if p in EAGER:
                        need, free = eager_bytes(B, H, T, T, elem, mode), available_bytes(dev)
                        if free is not None and need > 0.8 * free:
                            rows.skipped.append(Skip(p, point, f"torch eager would need {need / 2**30:.1f} GiB for "
                                                     f"the T×S scores ({free / 2**30:.1f} GiB free)"))
                            continue
                    result = _measure(p, q, k, v, is_causal, scale, mode, dev, min_time)
                    if isinstance(result, Skip):
                        rows.skipped.append(Skip(p, point, result.reason))
                        continue
                    timing, peak_mb = result
                    fl = attn_cost.flops(B, H, T, T, D, causal=is_causal, mode=mode)
                    tflops = fl / (timing.median_ms * 1e-3) / 1e12
                    extra = {"B": B, "H": H, "H_kv": H, "T": T, "S": T, "D": D, "causal": is_causal,
                             "flops": fl, "scale": scale, "threads": env["torch_threads"],
                             "load_avg_1m_before": env["load_avg_1m"],
                             "bytes_moved_fused": attn_cost.bytes_moved(B, H, H, T, T, D, dtype_bytes=elem, mode=mode),
                             "scores_mib": B * H * T * T * elem / 2**20,
                             "peak_flops": peak, "baseline": BASELINE}
                    if mode == "bwd":
                        extra["timed"] = "backward alone (autograd.grad on a retained graph)"
                    rows.append(Row.stamped(
                        dev, op="attention", shape=shape, dtype=dtype, mode=mode, provider=p,
                        median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                        runs=timing.runs, tflops=tflops, pct_of_peak=pct_of_peak(tflops * 1e12, peak),
                        peak_mem_mb=peak_mb, extra=json.dumps(extra, sort_keys=True)))
        del q, k, v
        release_memory(dev)
    bar.close()

    _speedups(rows)
    for r in rows:  # every row names what did not run in the same sweep
        r.extra = json.dumps({**json.loads(r.extra), "skipped": rows.skipped_summary()}, sort_keys=True)
    print_skipped(rows.skipped)
    if plot:
        plot_sweep(rows, plot, x=lambda r: json.loads(r.extra)["T"], y=lambda r: r.tflops,
                   series=lambda r: r.provider + (" causal" if json.loads(r.extra)["causal"] else ""),
                   xlabel="sequence length T", ylabel="TFLOP/s", title="attention")
    return rows


def _measure(provider, q, k, v, causal, scale, mode, dev, min_time):
    """(Timing, peak MiB or None) of one point, or a Skip when it ran out of memory or, for
    a provider other than the baselines, failed."""
    return measure_point(provider, lambda: build(provider, q, k, v, causal, scale), mode, dev, min_time,
                         baselines=("torch", "sdpa"))


def _speedups(rows: list[Row]) -> None:
    """speedup = baseline time / this row's time at the same shape and mode."""
    base = {(r.shape, r.mode): r.median_ms for r in rows if r.provider == BASELINE}
    for r in rows:
        if (r.shape, r.mode) in base:
            r.speedup = base[(r.shape, r.mode)] / r.median_ms
