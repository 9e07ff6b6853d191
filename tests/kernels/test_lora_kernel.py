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
import os

import pytest
import torch
from compile_check import compile_in_subprocess, poison_outputs

import ltk.kernels.lora as lora_mod
import ltk.kernels.lora_triton as lt
from ltk.kernels.backend import interpreter_on
from ltk.kernels.lora import (
    LoRALinearFunction,
    bytes_moved,
    flops,
    fused_is_faster,
    lora_linear,
    lora_linear_reference,
)

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
# The two routes: fused kernel or cuBLAS + low-rank term, chosen by the cost model
# ---------------------------------------------------------------------------------------
@triton_ok
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cublas_route_matches_float64_reference(monkeypatch, dtype, bias):
    monkeypatch.setattr(lora_mod, "ROUTE", "cublas")
    check((3, 5), 40, 33, 4, dtype, bias)
    check((9,), 24, 17, 20, dtype, bias, scale=-0.5, seed=2)   # r > the fused kernel's rank step


def test_route_cost_model():
    # bf16 on an H100 SXM (the default machine): fused where the saved 2·M·O·d bytes beat
    # cuBLAS's assumed 10% edge, d·F/(BW·L) > 1/0.9 − 1, i.e. L < ~5,300 with a full grid
    assert fused_is_faster(4096, 4096, 4096)                    # Llama-7B q/k/v/o
    assert fused_is_faster(4096, 11008, 4096)                   # up projection (L = 4096)
    assert not fused_is_faster(4096, 4096, 11008)               # down projection: L deep
    assert fused_is_faster(4096, 4096, 5000) and not fused_is_faster(4096, 4096, 6000)
    assert not fused_is_faster(64, 4096, 4096)                  # decode-like: a grid under one wave
    assert not fused_is_faster(4096, 4096, 4096, dtype_bytes=4, fp32=True)  # FMA dots: cuBLAS
    assert fused_is_faster(4096, 4096, 11008, efficiency=1.0)  # as fast as cuBLAS: always fused
    # the backward's dx is the same decision with O = K, L = N
    assert fused_is_faster(4096, 11008, 4096) != fused_is_faster(4096, 4096, 11008)


def test_route_must_be_known(monkeypatch):
    monkeypatch.setattr(lora_mod, "ROUTE", "cuda")
    x, w, b, a, bb, _ = make_inputs((5,), 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="ROUTE"):
        lora_mod._route(5, 8, 16, x)


# ---------------------------------------------------------------------------------------
# Compiled for a GPU (any machine) and run on one (CUDA only)
# ---------------------------------------------------------------------------------------
def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter is lax about types and shapes, the compiler is not: compile both
    kernels, as the launchers configure them, down to a cubin for sm_90a, every autotune
    candidate of the GEMM, and find no register spills."""
    compile_in_subprocess(__file__, tmp_path)


@pytest.mark.exhaustive
def test_kernels_compile_for_sm80_without_spills(tmp_path, monkeypatch):
    """The same for Ampere (sm_80), every candidate of the GEMM in both specializations."""
    monkeypatch.setenv("LTK_COMPILE_CC", "80")
    compile_in_subprocess(__file__, tmp_path)


def _gemm_source(lt_, triton_dtype: str, which: str, tile, has_bias: bool):
    """The GEMM as a launch specializes it: the unit strides constant (fwd: P = W and Q = B
    along L and R; dx: Wᵀ and Aᵀ along O), pointers and the other sizes and strides divisible
    by 16 (as at 4096-wide layers)."""
    from triton.compiler import ASTSource

    names = lt_._gemm_lowrank_kernel.arg_names
    t = "*" + triton_dtype
    sig = {n: "i32" if n in ("M", "O", "L", "R", "M_BUCKET") or n.startswith("stride") else "constexpr" for n in names}
    sig.update(X=t, P=t, V="*fp32", Q=t, BIAS=t, C=t, scale="fp32")
    bm, bo, bl = tile[:3]
    fp32 = triton_dtype == "fp32"
    ce = dict(HAS_BIAS=has_bias, EVEN_L=True, BLOCK_M=bm, BLOCK_O=bo, BLOCK_L=bl, BLOCK_R=lt_.RANK_STEP,
              GROUP_M=lt_.GROUP_M, FP32_DOTS=False, DOT_PRECISION="ieee" if fp32 else None,
              EPI_PRECISION="ieee" if fp32 else "tf32")
    ones = ("stride_pl", "stride_qr") if which == "fwd" else ("stride_po", "stride_qo")
    for n in ones:
        sig[n], ce[n] = "constexpr", 1
    div16 = [n for n in ("X", "P", "V", "Q", "BIAS", "C", "O", "L", "stride_po", "stride_pl", "stride_qo", "stride_qr")
             if n not in ones]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return ASTSource(fn=lt_._gemm_lowrank_kernel, signature=sig, constexprs=ce, attrs=attrs)


def _compile_all():
    from compile_check import compile_with_usage, require_nvidia_compiler

    GPUTarget, ASTSource = require_nvidia_compiler()

    cc = int(os.environ.get("LTK_COMPILE_CC", "90"))
    target = GPUTarget("cuda", cc, 32)  # sm_90a by default
    if cc != 90:  # another architecture: every GEMM candidate, both specializations
        for which in ("fwd", "dx"):
            for tile in lt.arch_tiles(cc):
                _, use = compile_with_usage(_gemm_source(lt, "bf16", which, tile, has_bias=which == "fwd"), target,
                                            dict(num_warps=tile[3], num_stages=tile[4]))
                assert use["spill_bytes"] == 0, (cc, which, tile, use)
        return
    for dtype, prec, torch_dtype in (("bf16", None, torch.bfloat16), ("fp32", "ieee", torch.float32)):
        for unit in ("stride_pl", "stride_pr"):  # u = x·Aᵀ reads A along L; g = dy·B reads B along r
            t = "*" + dtype
            sig = dict(X=t, P=t, OUT="*fp32", M="i32", L="i32", R="i32", stride_pr="i32", stride_pl="i32",
                       BLOCK_M="constexpr", BLOCK_L="constexpr", BLOCK_R="constexpr", FP32_DOTS="constexpr",
                       DOT_PRECISION="constexpr")
            sig[unit] = "constexpr"
            ce = {unit: 1, "BLOCK_M": lt.SKINNY_BLOCK_M, "BLOCK_L": lt.SKINNY_BLOCK_L[torch_dtype],
                  "BLOCK_R": lt.block_r(lt.MAX_RANK), "FP32_DOTS": False, "DOT_PRECISION": prec}
            names = lt._skinny_kernel.arg_names
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("X", "P", "OUT", "L")}
            _, use = compile_with_usage(ASTSource(fn=lt._skinny_kernel, signature=sig, constexprs=ce, attrs=attrs),
                                        target)
            assert use["spill_bytes"] == 0, ("skinny", dtype, unit, use)
    # every candidate, forward (bias) and dx (no bias) specializations; fp16 compiles as bf16
    # does (the same HGMMA shapes), so one fp16 candidate checks that dtype's path
    cases = [("bf16", which, tile) for tile in lt.arch_tiles(90) for which in ("fwd", "dx")]
    cases += [("fp16", "fwd", lt.TC_TILES[0])] + [("fp32", which, lt.FP32_TILE) for which in ("fwd", "dx")]
    for dtype, which, tile in cases:
        src = _gemm_source(lt, dtype, which, tile, has_bias=which == "fwd")
        k, use = compile_with_usage(src, target, dict(num_warps=tile[3], num_stages=tile[4]))
        assert use["spill_bytes"] == 0, (dtype, which, tile, use)
        assert k.metadata.shared <= 164 * 1024, (dtype, which, tile, k.metadata.shared)  # fits sm_80 too


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", [((3, 5), 40, 33, 4), ((4, 127), 1024, 1000, 16), ((2048,), 4096, 4096, 64),
                                        ((7,), 257, 129, 1)], ids=str)
def test_compiled_matches_float64_reference(dtype, lead, k, n, r):
    check(lead, k, n, r, dtype, bias=True)
    check(lead, k, n, r, dtype, bias=False, seed=1)
