"""SwiGLU / GeGLU kernels (ltk/kernels/swiglu.py): the output and both gradients of the triton
backend (the interpreter on a CPU) against the float64 reference, for the three activations, fp32,
fp16 and bf16, recompute on and off; the torch backend is eager PyTorch bit for bit; strided and
mixed-dtype inputs; bad input; the cost model; the kernels compiled for sm_90a and sm_80.

Error measure and budget as tests/kernels/test_rmsnorm.py: err = max|out − ref| / max|ref| per
tensor (y, dgate, dup; no cancellation in these products), ref in float64 from the same rounded
inputs; fp32 ≤ 1e-5; fp16/bf16 ≤ 3 × the err of eager PyTorch in that dtype + half an ulp. Every
buffer the kernels write starts as NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from compile_check import compile_in_subprocess, poison_outputs

import ltk.kernels.swiglu as sw
from ltk.kernels.swiglu import bytes_moved, flops, geglu, gelu_tanh, glu_reference, swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_BUDGET = 1e-5
LOW_PRECISION_FACTOR = 3.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["silu", "gelu_tanh", "gelu"]


def err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def op(activation: str, **kw):
    if activation == "silu":
        return lambda g, u, backend: swiglu(g, u, backend=backend, **kw)
    return lambda g, u, backend: geglu(g, u, approximate="tanh" if activation == "gelu_tanh" else "none",
                                       backend=backend, **kw)


def run(fn, g, u, dy):
    g, u = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    y = fn(g, u)
    y.backward(dy)
    return {"y": y.detach(), "dg": g.grad, "du": u.grad}


def check(shape, dtype, activation, *, recompute=True, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    g, u, dy = ((torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
                for _ in range(3))
    with poison_outputs(sw):
        got = run(lambda a, b: op(activation, recompute=recompute)(a, b, "triton"), g, u, dy)
    ref = run(lambda a, b: glu_reference(a, b, activation), g.double(), u.double(), dy.double())
    eager = run(lambda a, b: glu_reference(a, b, activation), g, u, dy)   # PyTorch in the inputs' dtype
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == dtype, k
        e = err(got[k], ref[k])
        budget = FP32_BUDGET if dtype == torch.float32 else \
            LOW_PRECISION_FACTOR * err(eager[k], ref[k]) + torch.finfo(dtype).eps / 2
        assert math.isfinite(e) and e <= budget, f"{k}: err {e:.2e} > {budget:.2e} ({activation}, {shape}, {dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "saved"])
def test_triton_matches_float64_reference(activation, dtype, recompute):
    check((3, 1001), dtype, activation, recompute=recompute)           # F = 1,001: a ragged last block
    check((2, 3, 7), dtype, activation, recompute=recompute, seed=1)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy; σ → 0 is right
def test_large_and_tiny_gates_stay_finite():
    """σ and tanh saturate: gates of ±60 (fp32) and ±1e-4 give the reference's values, no NaN."""
    for activation in ACTIVATIONS:
        g = torch.tensor([-60.0, -20.0, -1e-4, 0.0, 1e-4, 20.0, 60.0], device=DEVICE)
        gen = torch.Generator().manual_seed(2)
        u, dy = torch.randn(7, generator=gen).to(DEVICE), torch.randn(7, generator=gen).to(DEVICE)
        got = run(lambda a, b: op(activation)(a, b, "triton"), g, u, dy)
        ref = run(lambda a, b: glu_reference(a, b, activation), g.double(), u.double(), dy.double())
        for k in ref:
            assert torch.isfinite(got[k]).all() and err(got[k], ref[k]) <= FP32_BUDGET, (activation, k)


def test_torch_backend_is_eager_pytorch_bit_for_bit():
    """What the models computed before the kernels: F.silu(g) * u, T5's op-by-op tanh GELU, F.gelu."""
    gen = torch.Generator().manual_seed(3)
    g, u = torch.randn(4, 33, generator=gen), torch.randn(4, 33, generator=gen)
    assert torch.equal(swiglu(g, u, backend="torch"), F.silu(g) * u)
    assert torch.equal(geglu(g, u, backend="torch"), gelu_tanh(g) * u)
    assert torch.equal(geglu(g, u, approximate="none", backend="torch"), F.gelu(g) * u)
    assert torch.equal(swiglu(g, u), F.silu(g) * u)                       # "auto" on a CPU


def test_recompute_saves_two_tensors_and_saved_mode_three():
    g = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    u = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    for recompute, kept in ((True, 2), (False, 3)):
        y = swiglu(g, u, recompute=recompute, backend="triton")
        assert sum(t is not None for t in y.grad_fn.saved_tensors) == kept


def test_strided_and_mixed_dtype_inputs():
    """gate and up as the halves of one fused (M, 2F) projection (strided views), and an fp32
    gate with an fp16 up: the result is torch's promotion, each gradient in its input's dtype."""
    gen = torch.Generator().manual_seed(4)
    gu = torch.randn(6, 2 * 37, generator=gen).to(DEVICE)
    g, u = gu.chunk(2, dim=-1)
    assert not g.is_contiguous()
    assert torch.equal(swiglu(g, u, backend="triton"), swiglu(g.contiguous(), u.contiguous(), backend="triton"))
    g = torch.randn(6, 37, generator=gen).to(DEVICE).requires_grad_()
    u = torch.randn(6, 37, generator=gen).half().to(DEVICE).requires_grad_()
    y = geglu(g, u, backend="triton")
    assert y.dtype == torch.float32
    y.sum().backward()
    assert g.grad.dtype == torch.float32 and u.grad.dtype == torch.float16
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    glu_reference(g64, u64, "gelu_tanh").sum().backward()
    assert err(y, glu_reference(g.double(), u.double(), "gelu_tanh")) <= FP32_BUDGET
    assert err(g.grad, g64.grad) <= FP32_BUDGET and err(u.grad, u64.grad) <= torch.finfo(torch.float16).eps / 2


def test_empty_input():
    g = torch.randn(2, 0, 16, device=DEVICE, requires_grad=True)
    y = swiglu(g, g.detach().clone(), backend="triton")
    y.sum().backward()
    assert y.shape == (2, 0, 16) and g.grad.shape == g.shape


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(backend):
    g = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="up has"):
        swiglu(g, torch.randn(2, 7, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="gate"):
        swiglu(g.long(), g, backend=backend)
    with pytest.raises(TypeError, match="up"):
        swiglu(g, None, backend=backend)
    with pytest.raises(TypeError, match="recompute"):
        swiglu(g, g, recompute=1, backend=backend)
    with pytest.raises(ValueError, match="approximate"):
        geglu(g, g, approximate="erf", backend=backend)
    with pytest.raises(ValueError, match="different devices"):
        swiglu(g, g.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        swiglu(g, g, backend="Triton")


def test_triton_refuses_float64():
    g = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="gate"):
        swiglu(g, g, backend="triton")
    assert swiglu(g, g, backend="torch").dtype == torch.float64


def test_cost_model():
    n = 4096 * 14336
    assert bytes_moved(n) == 3 * 2 * n and bytes_moved(n, mode="bwd") == 5 * 2 * n
    assert bytes_moved(n, recompute=False) == 4 * 2 * n and bytes_moved(n, mode="bwd", recompute=False) == 6 * 2 * n
    assert bytes_moved(n, dtype_bytes=4, mode="fwd+bwd") == 8 * 4 * n
    for act in ACTIVATIONS:
        assert flops(n, activation=act, mode="fwd+bwd") == flops(n, activation=act) + flops(n, activation=act,
                                                                                              mode="bwd")
    assert flops(n) == 5 * n
    with pytest.raises(ValueError, match="mode"):
        bytes_moved(n, mode="forward")


# ----------------------------------------------------------------------------- compiled for a GPU
def test_kernels_compile_for_sm90a_and_sm80_without_spills(tmp_path):
    """The interpreter is lax about types, the compiler is not: every variant (activation, saved
    activation or not) in bf16, forward and backward, down to cubins for sm_90a (fp16 and fp32
    for silu) and sm_80 (the saved-activation variants), with no register spills."""
    compile_in_subprocess(__file__, tmp_path)


def _compile_all():
    from compile_check import compile_with_usage, require_nvidia_compiler

    GPUTarget, ASTSource = require_nvidia_compiler()
    for cc in (90, 80):
        target = GPUTarget("cuda", cc, 32)
        for dtype in ("bf16", "fp16", "fp32"):
            t = "*" + dtype
            for act in sw.ACTIVATIONS.values():
                if dtype != "bf16" and (act != 0 or cc != 90):
                    continue  # the other dtypes change only the loads' and stores' conversions
                for flag in ((False, True) if cc == 90 else (True,)):  # sm_80: the variants with more live values
                    for kernel, sig, name in (
                            (sw._glu_fwd_kernel, dict(G=t, U=t, Y=t, A=t, N="i32"), "SAVE_ACT"),
                            (sw._glu_bwd_kernel, dict(G=t, U=t, A=t, DY=t, DG=t, DU=t, N="i32"), "HAS_ACT")):
                        consts = {"ACT": act, name: flag, "BLOCK": sw.BLOCK}
                        sig = {**sig, **{c: "constexpr" for c in consts}}
                        attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
                                 if sig[a].startswith("*") or a == "N"}
                        _, use = compile_with_usage(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                                    target, dict(num_warps=sw.NUM_WARPS))
                        assert use["spill_bytes"] == 0, (cc, dtype, act, name, flag, use)
