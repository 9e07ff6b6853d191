"""Fused LoRA linear (ltk/kernels/lora.py, ltk/kernels/lora_triton.py): y and the gradients dx, dA,
dB (and db, dW when asked) of the triton backend (the interpreter on a CPU, compiled on
CUDA) and of the torch backend against a float64 reference; the reuse of the saved
u = x·Aᵀ; poisoned outputs; bad input; the cost model; the kernels compiled for sm_90.

Error measure: err = max|out − ref| / max|ref| per tensor, ref in float64 from the same
(rounded) inputs. Budget: fp32 1e-5; fp16/bf16 3 × the err of torch's own ops (the same
chain, F.linear + s·(x·Aᵀ)·Bᵀ, autograd in that dtype) on the same inputs + half an ulp of
the dtype (no output is closer than its own rounding). NaN never passes; every buffer the
kernels write starts as NaN.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from compile_check import compile_in_subprocess, poison_outputs

import ltk.kernels.lora_triton as lt
from ltk.kernels.backend import interpreter_on
from ltk.kernels.lora import LoRALinearFunction, bytes_moved, flops, lora_linear, lora_linear_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_on(),
                               reason="triton backend needs CUDA or TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: the compiled kernels run only there")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def poisoned():
    return poison_outputs(lt)


def make_inputs(lead, k, n, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype).to(DEVICE)
    x = rnd(*lead, k)
    w = rnd(n, k, std=k ** -0.5)
    b = rnd(n) if bias else None
    a = rnd(r, k, std=k ** -0.5)
    bb = rnd(n, r, std=r ** -0.5)      # nonzero B: the trained state, not LoRA's zero init
    dy = rnd(*lead, n)
    return x, w, b, a, bb, dy


def forward_backward(x, w, b, a, bb, dy, scale, backend):
    """(y, dx, dA, dB) with gradients for x, A, B only (W and b frozen)."""
    xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    y = lora_linear(xg, w, b, ag, bg, scale, backend=backend)
    y.backward(dy)
    return y.detach(), xg.grad, ag.grad, bg.grad


def reference64(x, w, b, a, bb, dy, scale):
    xg, ag, bg = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y = lora_linear_reference(xg, w.double(), None if b is None else b.double(), ag, bg, scale)
    y.backward(dy.double())
    return y.detach(), xg.grad, ag.grad, bg.grad


def rel_err(out, ref):
    return (out.double() - ref).abs().max().item() / ref.abs().max().item()


def check(lead, k, n, r, dtype, bias, scale=0.75, seed=0):
    inputs = make_inputs(lead, k, n, r, dtype, bias, seed)
    refs = reference64(*inputs, scale)
    base = forward_backward(*inputs, scale, "torch")           # torch's own ops in the dtype: the yardstick
    with poisoned():
        outs = forward_backward(*inputs, scale, "triton")
    for name, out, ref, bse in zip(("y", "dx", "dA", "dB"), outs, refs, base):
        assert out.dtype == dtype and out.shape == ref.shape, name
        budget = 1e-5 if dtype == torch.float32 else 3 * rel_err(bse, ref) + torch.finfo(dtype).eps / 2
        e = rel_err(out, ref)
        assert math.isfinite(e) and e <= budget, \
            f"{name}: err {e:.2e} > budget {budget:.2e} ({lead}, {k}, {n}, {r}, {dtype})"


# ---------------------------------------------------------------------------------------
# Triton against the float64 reference
# ---------------------------------------------------------------------------------------
@triton_ok
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_matches_float64_reference(dtype, r, bias):
    check((3, 5), 40, 33, r, dtype, bias)                      # M = 15, K = 40, N = 33: no multiple of a tile


@triton_ok
@pytest.mark.parametrize("lead,k,n,r", [((1,), 1, 1, 1), ((2, 3, 7), 70, 19, 5), ((37,), 33, 65, 64),
                                        ((), 17, 3, 2)], ids=str)
def test_triton_odd_shapes(lead, k, n, r):
    # tiny K and N; several tiles in every dim with r = 64 (BLOCK_R 64); x without lead dims
    check(lead, k, n, r, torch.float32, True, scale=-1.3, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_backend_is_the_reference(dtype):
    x, w, b, a, bb, dy = make_inputs((4, 3), 24, 10, 3, dtype)
    y, dx, da, db_ = forward_backward(x, w, b, a, bb, dy, 2.0, "torch")
    assert torch.equal(y, lora_linear_reference(x, w, b, a, bb, 2.0))
    ref = reference64(x, w, b, a, bb, dy, 2.0)
    for out, r_ in zip((y, dx, da, db_), ref):
        assert rel_err(out, r_) <= 1e-6


# ---------------------------------------------------------------------------------------
# Saved u is reused; which gradients are computed
# ---------------------------------------------------------------------------------------
@triton_ok
def test_backward_reuses_saved_u(monkeypatch):
    calls = []
    real = lt.skinny_triton

    def counting(x2, p, transpose=False):
        calls.append((p.shape, transpose))
        return real(x2, p, transpose)

    monkeypatch.setattr(lt, "skinny_triton", counting)
    x, w, b, a, bb, dy = make_inputs((15,), 40, 33, 4, torch.float32)
    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, bb))
    y = lora_linear(xg, w, b, ag, bg, 0.5, backend="triton")
    assert calls == [((4, 40), False)]                          # u = x·Aᵀ, once
    saved = y.grad_fn.saved_tensors
    u = [t for t in saved if t.shape == (15, 4)]
    assert len(u) == 1 and u[0].dtype == torch.float32
    assert torch.allclose(u[0].double(), x.double() @ a.double().t(), rtol=1e-6, atol=1e-6)
    y.backward(dy)
    assert calls == [((4, 40), False), ((33, 4), True)]        # backward: only g = dy·B, no second x·Aᵀ
    assert torch.allclose(bg.grad.double(), 0.5 * dy.double().t() @ u[0].double(), rtol=1e-6, atol=1e-6)


@triton_ok
def test_gradients_only_where_asked():
    x, w, b, a, bb, dy = make_inputs((6,), 20, 9, 3, torch.float32)
    ag, bg = a.clone().requires_grad_(), bb.clone().requires_grad_()
    y = lora_linear(x, w, b, ag, bg, 1.0, backend="triton")    # x frozen: no dx kernel needed
    y.backward(dy)
    ref = reference64(x, w, b, a, bb, dy, 1.0)
    assert rel_err(ag.grad, ref[2]) <= 1e-5 and rel_err(bg.grad, ref[3]) <= 1e-5
    # an unfrozen W and b get their (unfused) gradients too
    wg, bsg = w.clone().requires_grad_(), b.clone().requires_grad_()
    lora_linear(x, wg, bsg, a, bb, 1.0, backend="triton").backward(dy)
    assert rel_err(wg.grad, dy.double().t() @ x.double()) <= 1e-5
    assert rel_err(bsg.grad, dy.double().sum(0)) <= 1e-5
    assert isinstance(y.grad_fn, LoRALinearFunction._backward_cls)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def test_bad_input():
    x, w, b, a, bb, _ = make_inputs((5,), 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        lora_linear(x, w[:, :15], b, a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, w, b, a[:, :15], bb, 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear(x, w, b, a, bb[:, :1], 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear(x, w, b, a, bb[:7], 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        lora_linear(x, w, b[:7], a, bb, 1.0)
    with pytest.raises(TypeError, match="lora_A has dtype"):
        lora_linear(x, w, b, a.double(), bb, 1.0)
    with pytest.raises(TypeError, match="scale"):
        lora_linear(x, w, b, a, bb, torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, w, b, a, bb, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="0-d"):
        lora_linear(torch.tensor(1.0), w, b, a, bb, 1.0)


@triton_ok
def test_bad_input_triton():
    x, w, b, a, bb, _ = make_inputs((5,), 16, 8, 129, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        lora_linear(x.double(), w.double(), b.double(), a[:2].double(), bb[:, :2].double(), 1.0, backend="triton")


# ---------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------
def test_cost_model():
    m, n, k, r = 4096, 4096, 4096, 8
    assert flops(m, n, k, r) == 2 * m * n * k + 2 * m * r * (n + k)
    assert flops(m, n, k, r, mode="fwd+bwd") == flops(m, n, k, r) + flops(m, n, k, r, mode="bwd")
    for d in (2, 4):
        fused, unfused = bytes_moved(m, n, k, r, dtype_bytes=d), bytes_moved(m, n, k, r, dtype_bytes=d, fused=False)
        u_diff = 2 * m * r * (4 - d)                           # u written and read: fp32 fused, dtype unfused
        assert unfused - fused == 4 * m * n * d - u_diff
        bwd = bytes_moved(m, n, k, r, dtype_bytes=d, mode="bwd")
        unfused_bwd = bytes_moved(m, n, k, r, dtype_bytes=d, mode="bwd", fused=False)
        assert unfused_bwd - bwd == 4 * m * k * d - 4 * m * r * (4 - d)
    assert 1.9 < bytes_moved(m, n, k, r, fused=False) / bytes_moved(m, n, k, r) < 2.1
    # no bias: N·d fewer bytes
    assert bytes_moved(m, n, k, r) - bytes_moved(m, n, k, r, bias=False) == 2 * n
    with pytest.raises(ValueError, match="mode"):
        flops(m, n, k, r, mode="backward")


# ---------------------------------------------------------------------------------------
# Compiled for a GPU (any machine) and run on one (CUDA only)
# ---------------------------------------------------------------------------------------
def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter is lax about types and shapes, the compiler is not: compile both
    kernels, as the launchers configure them, down to a cubin for sm_90."""
    compile_in_subprocess(__file__, tmp_path)


def _compile_all():
    try:  # the compiler's Python API moves between Triton versions
        import triton
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        assert "nvidia" in backends
    except (ImportError, AssertionError) as e:
        print(f"cannot drive this Triton's NVIDIA compiler directly: {e!r}")
        sys.exit(3)
    target = GPUTarget("cuda", 90, 32)
    bm, bo, bl = lt._GPU_TILES
    for dtype, prec, epi in (("bf16", None, "tf32"), ("fp16", None, "tf32"), ("fp32", "ieee", "ieee")):
        t = "*" + dtype
        for r in (1, 16, 64):
            sig = dict(X=t, P=t, OUT="*fp32", M="i32", L="i32", R="i32", stride_pr="i32", stride_pl="i32",
                       BLOCK_M="constexpr", BLOCK_L="constexpr", BLOCK_R="constexpr", FP32_DOTS="constexpr",
                       DOT_PRECISION="constexpr")
            ce = dict(BLOCK_M=lt._GPU_SKINNY_BLOCK_M, BLOCK_L=bl, BLOCK_R=lt.block_r(r), FP32_DOTS=False,
                      DOT_PRECISION=prec)
            triton.compile(ASTSource(fn=lt._skinny_kernel, signature=sig, constexprs=ce), target=target)
            for has_bias in (True, False):
                sig = dict(X=t, P=t, V="*fp32", Q=t, BIAS=t, C=t, M="i32", O="i32", L="i32", R="i32", scale="fp32",
                           stride_po="i32", stride_pl="i32", stride_qo="i32", stride_qr="i32",
                           HAS_BIAS="constexpr", BLOCK_M="constexpr", BLOCK_O="constexpr", BLOCK_L="constexpr",
                           BLOCK_R="constexpr", FP32_DOTS="constexpr", DOT_PRECISION="constexpr",
                           EPI_PRECISION="constexpr")
                ce = dict(HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_O=bo, BLOCK_L=bl, BLOCK_R=lt.block_r(r),
                          FP32_DOTS=False, DOT_PRECISION=prec, EPI_PRECISION=epi)
                k = triton.compile(ASTSource(fn=lt._gemm_lowrank_kernel, signature=sig, constexprs=ce), target=target)
                assert k.metadata.shared <= 228 * 1024, k.metadata.shared


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", [((3, 5), 40, 33, 4), ((4, 127), 1024, 1000, 16), ((2048,), 4096, 4096, 64),
                                        ((7,), 257, 129, 1)], ids=str)
def test_compiled_matches_float64_reference(dtype, lead, k, n, r):
    check(lead, k, n, r, dtype, bias=True)
    check(lead, k, n, r, dtype, bias=False, seed=1)
