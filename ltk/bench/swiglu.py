"""swiglu: GB/s of the gated MLP activation y = act(g) ∘ u (SwiGLU, or GeGLU with --activation),
ours against eager PyTorch, the compiler and Liger, over hidden widths F, in the forward, backward
and forward+backward modes, as a fraction of the measured copy bandwidth (ltk/bench/bandwidth.py).

The bytes are ltk/kernels/swiglu.py's `bytes_moved` with recompute (read g, u, write y forward;
read g, u, dy, write dg, du backward), charged to every provider, so the saved-activation variant
and eager PyTorch, which move more, show fewer GB/s.

Providers:
  ours           kernels.swiglu / geglu, backend="triton", recompute=True (CUDA only)
  ours-saved     the same with recompute=False: the forward also writes act(g), the backward reads it
  torch          eager: F.silu(g) * u (F.gelu; T5's op-by-op tanh GELU for gelu_tanh)
  torch.compile  the eager function compiled by inductor (CUDA only)
  liger          Liger-Kernel's LigerSiLUMulFunction / LigerGELUMulFunction (tanh GELU only; CUDA
                 only). Its backward writes dg and du over its saved inputs, g and u (in place), so
                 the benchmark's inputs hold gradients after the first backward: the time is the same.

    ltk bench swiglu                                          # CPU: 256 rows × 1001, 4096; fp32
    ltk bench swiglu --device cuda --plot swiglu.png          # GPU: 4096 rows × 4k … 28k, bf16
    ltk bench swiglu --device cuda --activation gelu_tanh --modes fwd,bwd
"""
from __future__ import annotations

import torch

from ltk.bench.bandwidth import Point, run_sweep
from ltk.bench.harness import resolve_device
from ltk.bench.sweep import DTYPES, MODES, kernel_unavailable, parse_choices, parse_dtype, parse_sizes

PROVIDERS = ("ours", "ours-saved", "torch", "torch.compile", "liger")
BASELINE = "torch"
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
CUDA_SHAPES = (4096, (4096, 8192, 11008, 14336, 28672))  # (rows = tokens, widths F: Llama-2/3 MLPs and more)
CPU_SHAPES = (256, (1001, 4096))


def _liger(activation: str):
    if activation == "silu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply


def unavailable(provider: str, activation: str, dev: torch.device) -> str | None:
    """Why `provider` cannot run at all on `dev`, or None."""
    if provider == "ours-saved":
        provider = "ours"
    why = kernel_unavailable(provider, dev)
    if why or provider != "liger":
        return why
    if activation == "gelu":
        return "liger has no erf GELU gate (its GeGLU is the tanh approximation)"
    try:
        _liger(activation)
    except ImportError:
        return "liger-kernel not installed"
    return None if dev.type == "cuda" else "liger needs CUDA"


def glu_fn(provider: str, activation: str):
    """f(g, u) -> y for a provider."""
    from ltk.kernels import swiglu as kernel

    if provider in ("ours", "ours-saved"):
        recompute = provider == "ours"
        if activation == "silu":
            return lambda g, u: kernel.swiglu(g, u, recompute=recompute, backend="triton")
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        return lambda g, u: kernel.geglu(g, u, approximate=approximate, recompute=recompute, backend="triton")
    eager = lambda g, u: kernel.glu_reference(g, u, activation)  # noqa: E731
    if provider == "torch":
        return eager
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh, static-shape compile per point
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        return _liger(activation)
    raise ValueError(f"unknown provider {provider!r}")


def build(provider: str, activation: str, g: torch.Tensor, u: torch.Tensor):
    """(forward, inputs) for one provider: fresh leaf copies of g and u, requires_grad."""
    g, u = (t.detach().clone().requires_grad_(True) for t in (g, u))
    f = glu_fn(provider, activation)
    return (lambda: f(g, u)), [g, u]


def run(*, activation: str = "silu", ffn_sizes: str | None = None, rows: int | None = None, dtype: str = "auto",
        modes: str = "all", providers: str = "all", min_time: float = 0.25, copy_mib: int | None = None,
        device: str = "auto", seed: int = 0, plot: str | None = None):
    """Time y = act(g) ∘ u for every (width F, mode, provider); one Row each.

    activation: silu (SwiGLU), gelu_tanh (T5 1.1's GeGLU), gelu (erf GeGLU). ffn_sizes: comma list
    of widths F ("4k,14336"); None = the device default (CUDA: 4k … 28k with 4096 rows; CPU: 1001,
    4096 with 256 rows). rows: tokens. dtype: auto (bf16 on CUDA, fp32 on a CPU), fp32, fp16,
    bf16. modes, providers: comma lists or "all". copy_mib: MiB copied to measure the bandwidth."""
    from ltk.kernels import swiglu as kernel

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dev = resolve_device(device)
    n_rows, sizes = CUDA_SHAPES if dev.type == "cuda" else CPU_SHAPES
    n_rows = rows or n_rows
    sizes = parse_sizes(ffn_sizes) if ffn_sizes is not None else list(sizes)
    dtype = parse_dtype(dtype, dev)
    mode_list = list(MODES) if modes == "all" else parse_choices(modes, MODES, "mode")
    wanted = list(PROVIDERS) if providers == "all" else parse_choices(providers, PROVIDERS, "provider")
    elem = DTYPES[dtype].itemsize

    def point(width: int):
        def make() -> Point:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            g, u = (torch.randn(n_rows, width, generator=gen).to(dev, DTYPES[dtype]) for _ in range(2))
            n = n_rows * width
            return Point(f"rows={n_rows},cols={width}", width, {"g": g, "u": u},
                         nbytes=lambda mode: kernel.bytes_moved(n, dtype_bytes=elem, mode=mode),
                         nflops=lambda mode: kernel.flops(n, activation=activation, mode=mode),
                         extra={"rows": n_rows, "cols": width, "activation": activation})
        return make

    op = {"silu": "swiglu", "gelu_tanh": "geglu-tanh", "gelu": "geglu"}[activation]
    return run_sweep(op, [point(w) for w in sizes], wanted, lambda p: unavailable(p, activation, dev),
                     lambda p, t: build(p, activation, t["g"], t["u"]), dev=dev, dtype=dtype, modes=mode_list,
                     min_time=min_time, copy_mib=copy_mib, baselines=("torch",), baseline=BASELINE,
                     xlabel="hidden width F", plot=plot)
