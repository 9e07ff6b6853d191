"""rope: GB/s of rotary position embedding on q and k, ours against eager PyTorch, the compiler and
Liger, over sequence lengths, in the forward, backward and forward+backward modes, as a fraction of
the measured copy bandwidth (ltk/bench/bandwidth.py).

The inputs are laid out as the models make them: q = (B, T, Hq·D) projection viewed as (B, T, Hq, D)
and transposed to (B, Hq, T, D), k likewise with Hkv heads (grouped-query attention), and one
(T, D) cos/sin in the activations' dtype (as Llama and transformers pass them). The bytes are
ltk/kernels/rope.py's `bytes_moved`: read q and k, write q' and k', read cos and sin once.

Providers:
  ours           kernels.apply_rope, backend="triton", out of place (CUDA only)
  ours-inplace   the same, inplace=True: rotates q and k where they lie, a launch each. Forward
                 only: autograd refuses in-place ops on the leaves a timed backward starts from
  torch          eager: ltk/kernels/rope.py's reference (chunk, cat, two products, a sum) on q and k
  torch.compile  the eager function compiled by inductor (CUDA only)
  liger          Liger-Kernel's liger_rotary_pos_emb (CUDA only). It rotates the (B, T, H, D) memory
                 of its inputs in place (here the leaves' data: the values change, the time does not)

    ltk bench rope                                             # CPU: B=1, 4+2 heads × 64, T=128, 512
    ltk bench rope --device cuda --plot rope.png               # GPU: Llama-3-8B heads, B=4, T=1k … 8k
"""
from __future__ import annotations

import torch

from ltk.bench.bandwidth import Point, run_sweep
from ltk.bench.harness import resolve_device
from ltk.bench.sweep import DTYPES, MODES, kernel_unavailable, parse_choices, parse_dtype, parse_sizes

PROVIDERS = ("ours", "ours-inplace", "torch", "torch.compile", "liger")
BASELINE = "torch"
CUDA_SHAPES = dict(batch=4, heads=32, kv_heads=8, head_dim=128, seq_lens=(1024, 2048, 4096, 8192))  # Llama-3-8B
CPU_SHAPES = dict(batch=1, heads=4, kv_heads=2, head_dim=64, seq_lens=(128, 512))


def unavailable(provider: str, dev: torch.device) -> str | None:
    """Why `provider` cannot run at all on `dev`, or None."""
    why = kernel_unavailable("ours" if provider == "ours-inplace" else provider, dev)
    if why or provider != "liger":
        return why
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb  # noqa: F401
    except ImportError:
        return "liger-kernel not installed"
    return None if dev.type == "cuda" else "liger needs CUDA"


def skip_mode(provider: str, mode: str) -> str | None:
    if provider == "ours-inplace" and mode != "fwd":
        return "in place is timed forward only: the timed backward starts from leaves, which autograd " \
               "will not let an op modify (the backward is ours')"
    return None


def rope_fn(provider: str):
    """f(q, k, cos, sin) -> (q', k') for a provider."""
    from ltk.kernels import rope as kernel

    if provider in ("ours", "ours-inplace"):
        inplace = provider == "ours-inplace"
        return lambda q, k, cos, sin: kernel.apply_rope(q, k, cos, sin, inplace=inplace, backend="triton")

    def eager(q, k, cos, sin):
        return kernel.rope_reference(q, cos, sin), kernel.rope_reference(k, cos, sin)
    if provider == "torch":
        return eager
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh, static-shape compile per point
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return lambda q, k, cos, sin: liger_rotary_pos_emb(q, k, cos[None], sin[None])  # cos: (1, T, D)
    raise ValueError(f"unknown provider {provider!r}")


def build(provider: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(forward, inputs) for one provider: fresh (B, T, H, D) leaves, requires_grad; the forward
    views them as the models do, (B, H, T, D) with strides."""
    q, k = (t.detach().clone().requires_grad_(True) for t in (q, k))
    f = rope_fn(provider)
    return (lambda: f(q.transpose(1, 2), k.transpose(1, 2), cos, sin)), [q, k]


def run(*, seq_lens: str | None = None, batch: int | None = None, heads: int | None = None,
        kv_heads: int | None = None, head_dim: int | None = None, dtype: str = "auto", modes: str = "all",
        providers: str = "all", min_time: float = 0.25, copy_mib: int | None = None, device: str = "auto",
        seed: int = 0, plot: str | None = None):
    """Time RoPE on q and k for every (sequence length, mode, provider); one Row each.

    seq_lens: comma list ("1k,4k"); None and the sizes left out: the device default (CUDA:
    Llama-3-8B's 32 query and 8 key/value heads of 128, B=4, T=1k … 8k; CPU: 4+2 heads of 64, B=1,
    T=128, 512). dtype: auto (bf16 on CUDA, fp32 on a CPU), fp32, fp16, bf16. modes, providers:
    comma lists or "all"."""
    from ltk.kernels import rope as kernel
    from ltk.models.llama import rope_cos_sin

    dev = resolve_device(device)
    d = CUDA_SHAPES if dev.type == "cuda" else CPU_SHAPES
    B, hq, hk, D = batch or d["batch"], heads or d["heads"], kv_heads or d["kv_heads"], head_dim or d["head_dim"]
    if hq % hk or D % 2:
        raise ValueError(f"heads ({hq}) must be a multiple of kv_heads ({hk}) and head_dim ({D}) even")
    sizes = parse_sizes(seq_lens) if seq_lens is not None else list(d["seq_lens"])
    dtype = parse_dtype(dtype, dev)
    mode_list = list(MODES) if modes == "all" else parse_choices(modes, MODES, "mode")
    wanted = list(PROVIDERS) if providers == "all" else parse_choices(providers, PROVIDERS, "provider")
    dt = DTYPES[dtype]

    def point(T: int):
        def make() -> Point:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            q = torch.randn(B, T, hq, D, generator=gen).to(dev, dt)            # (B, T, Hq, D)
            k = torch.randn(B, T, hk, D, generator=gen).to(dev, dt)
            cos, sin = (t.to(dt) for t in rope_cos_sin(torch.arange(T, device=dev), D, 500000.0))  # (T, D)
            return Point(f"B={B},Hq={hq},Hkv={hk},T={T},D={D}", T, dict(q=q, k=k, cos=cos, sin=sin),
                         nbytes=lambda mode: kernel.bytes_moved(B, hq, hk, T, D, dtype_bytes=dt.itemsize, mode=mode),
                         nflops=lambda mode: kernel.flops(B, hq, hk, T, D, mode=mode),
                         extra=dict(batch=B, heads=hq, kv_heads=hk, seq=T, head_dim=D))
        return make

    return run_sweep("rope", [point(T) for T in sizes], wanted, lambda p: unavailable(p, dev),
                     lambda p, t: build(p, t["q"], t["k"], t["cos"], t["sin"]), dev=dev, dtype=dtype,
                     modes=mode_list, min_time=min_time, copy_mib=copy_mib, baselines=("torch",), baseline=BASELINE,
                     xlabel="sequence length T", plot=plot, skip_mode=skip_mode)
