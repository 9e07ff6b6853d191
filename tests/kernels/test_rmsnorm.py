"""RMSNorm kernels (ltk/kernels/rmsnorm.py): the output and every gradient of the triton backend
(compiled on CUDA, the interpreter on a CPU) and of the torch backend against the float64
reference, on odd shapes and fuzzed ones; bad input; the cost model.

Error measure: err(out, ref) = max|out − ref| / max(max|ref|, T), per tensor (y, h, dx,
d(residual), dw), with ref computed in float64 from the same (rounded) inputs, and T the
size of the terms the output is computed from (`term_scales`: max|rstd · dy ∘ w| for dx,
max_j Σ_rows |dy ∘ x̂| for dw, ...). Rounding error scales with the terms, not with the
result; the two are of the same order except where the terms cancel (widths 1-2, a few rows
of random-sign dy), and there max|ref| alone would call noise a failure.

Budget (the design notes, "how close is close enough"): fp32 ≤ 1e-5, or ≤ 3 × PyTorch's own
fp32 err where even that is larger (LayerNorm of two nearly equal values, where x − μ
cancels); fp16/bf16 ≤ 3 × the err of PyTorch's own op (F.rms_norm) run in that dtype on the
same inputs, + half an ulp of the dtype (no output is closer than its own rounding). NaN
never passes, and every buffer the kernels write starts as NaN, so an element they forget
fails.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from compile_check import compile_in_subprocess, poison_outputs
from hypothesis import given, settings
from hypothesis import strategies as st

import ltk.kernels.norm_common as nc
import ltk.kernels.rmsnorm as rn
from ltk.kernels.norm_common import MAX_WIDTH
from ltk.kernels.rmsnorm import bytes_moved, flops, rms_norm, rms_norm_reference, rms_norm_residual

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: bf16 is only checked compiled")
FP32_BUDGET = 1e-5
LOW_PRECISION_FACTOR = 3.0

# Liger-style odd shapes: leading dims, a single row, widths that are primes, powers of two
# plus one, wider than 8192, width 1, and more row tiles than backward programs.
SHAPES = [(5, 123, 123), (1, 1, 1023), (3, 7), (2, 4097), (2, 9001), (1, 16384), (4, 1), (300, 40)]


def err(out: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """max|out − ref| / max(max|ref|, scale)."""
    if ref.numel() == 0:
        return 0.0
    scale = max(ref.abs().max().item(), scale)
    diff = (out.double() - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def poisoned(module):
    """Every buffer the kernels write starts as NaN."""
    return poison_outputs(module)


def make_inputs(shape, dtype, *, residual=False, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rnd(*s, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dt).to(DEVICE)

    return dict(
        x=rnd(*shape), r=rnd(*shape) if residual else None, w=rnd(n, dt=weight_dtype or dtype, scale=0.5, shift=1.0),
        dy=rnd(*shape), dh=rnd(*shape) if residual else None,
    )


def forward_backward(inp, fn):
    """Run fn(x, r, w) -> (y, h or None) with fresh leaves; return outputs and gradients."""
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "r", "w") if inp[k] is not None}
    y, h = fn(leaves["x"], leaves.get("r"), leaves["w"])
    outs, grads = [y], [inp["dy"]]
    if h is not None:
        outs.append(h)
        grads.append(inp["dh"])
    torch.autograd.backward(outs, grads)
    res = {"y": y.detach(), "dx": leaves["x"].grad, "dw": leaves["w"].grad}
    if h is not None:
        res.update(h=h.detach(), dr=leaves["r"].grad)
    return res


def ours(backend, eps):
    def fn(x, r, w):
        if r is None:
            return rms_norm(x, w, eps, backend=backend), None
        return rms_norm_residual(x, r, w, eps, backend=backend)
    return fn


def reference(eps):
    def fn(x, r, w):
        h = x + r if r is not None else None
        return rms_norm_reference(h if h is not None else x, w, eps), h
    return fn


def pytorch_op(eps):
    """PyTorch's own op in the inputs' dtype: the yardstick of the low-precision budget."""
    def fn(x, r, w):
        h = x + r if r is not None else None
        return F.rms_norm(h if h is not None else x, (x.shape[-1],), w.to(x.dtype), eps), h
    return fn


def term_scales(inp, h, eps):
    """How large the terms are that each output is computed from (float64): rounding error
    scales with them, and can dwarf the result where the terms cancel."""
    dy, w = inp["dy"].double(), inp["w"].double()
    rstd = ((h * h).mean(dim=-1, keepdim=True) + eps).rsqrt()
    per_col = lambda t: t.reshape(-1, t.shape[-1]).abs().sum(0).max().item()  # max_j Σ_rows |t_ij|
    s = dict(y=0.0, dx=(rstd * dy * w).abs().max().item(), dw=per_col(dy * h * rstd), h=0.0)  # dx: rstd·g
    s["dr"] = s["dx"]
    return s


def check(shape, dtype, *, backend="triton", residual=False, eps=1e-6, weight_dtype=None, seed=0):
    inp = make_inputs(shape, dtype, residual=residual, weight_dtype=weight_dtype, seed=seed)
    with poisoned(rn):
        got = forward_backward(inp, ours(backend, eps))
    ref = forward_backward({k: None if v is None else v.double() for k, v in inp.items()}, reference(eps))
    base = forward_backward(inp, pytorch_op(eps))
    assert got.keys() == ref.keys()
    scales = term_scales(inp, ref["h"] if residual else inp["x"].double(), eps)
    errors = {}
    for k in ref:
        assert got[k].shape == ref[k].shape
        assert got[k].dtype == (inp["w"].dtype if k == "dw" else inp["x"].dtype)
        e = err(got[k], ref[k], scales[k])
        budget = LOW_PRECISION_FACTOR * err(base[k], ref[k], scales[k])
        if dtype == torch.float32:  # or within 3x of PyTorch, for inputs where even it cannot do 1e-5
            budget = max(FP32_BUDGET, budget)
        else:  # + half an ulp: an output is never closer than its own rounding
            budget += torch.finfo(dtype).eps / 2
        assert math.isfinite(e) and e <= budget, f"{k}: err {e:.2e} > budget {budget:.2e} ({shape}, {dtype})"
        errors[k] = e
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_matches_float64_reference(shape, dtype, residual):
    check(shape, dtype, residual=residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_torch_backend_matches_float64_reference(dtype, residual):
    for shape in [(3, 41, 123), (3, 7), (2, 9001)]:
        check(shape, dtype, backend="torch", residual=residual)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_weights_with_fp16_activations(backend):
    check((4, 33, 257), torch.float16, backend=backend, residual=True, weight_dtype=torch.float32)
    x = torch.randn(3, 8, dtype=torch.float16, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend=backend)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp16_branch_added_to_an_fp32_residual_stream(backend):
    """h = x + residual promotes as torch's add does: fp16 + fp32 -> fp32 h and y; each input
    gets its gradient in its own dtype."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, generator=g).half().to(DEVICE).requires_grad_()
    r = torch.randn(5, 40, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(40, device=DEVICE)
    dy, dh = torch.randn(5, 40, device=DEVICE), torch.randn(5, 40, device=DEVICE)
    y, h = rms_norm_residual(x, r, w, backend=backend)
    assert y.dtype == h.dtype == torch.float32
    torch.autograd.backward([y, h], [dy, dh])
    assert x.grad.dtype == torch.float16 and r.grad.dtype == torch.float32
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64 + r64, w.double())
    torch.autograd.backward([y64, x64 + r64], [dy.double(), dh.double()])
    assert err(y, y64) <= FP32_BUDGET and err(h, x64 + r64) <= FP32_BUDGET and err(r.grad, r64.grad) <= FP32_BUDGET
    assert err(x.grad, x64.grad) <= torch.finfo(torch.float16).eps / 2        # fp16 rounding of the fp32 gradient


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), width=st.integers(1, 2100), dtype=st.sampled_from([torch.float32, torch.float16]),
       eps=st.sampled_from([1e-8, 1e-6, 1e-5, 0.1]), residual=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzzed_shapes(rows, width, dtype, eps, residual, seed):
    check((rows, width), dtype, residual=residual, eps=eps, seed=seed)


def test_zero_rows_stay_finite():
    """RMSNorm of an all-zero row is 0 (ε keeps rstd finite), and so is its gradient."""
    x = torch.zeros(3, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.backward(torch.randn_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(x.grad).all()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_residual_gradients_when_only_one_output_is_used(backend):
    inp = make_inputs((6, 50), torch.float32, residual=True)
    x, r = (inp[k].clone().requires_grad_() for k in ("x", "r"))
    y, h = rms_norm_residual(x, r, inp["w"], backend=backend)
    h.backward(inp["dh"])                                        # only the residual stream
    assert torch.equal(x.grad, inp["dh"]) and torch.equal(r.grad, inp["dh"])
    x.grad = r.grad = None
    y, h = rms_norm_residual(x, r, inp["w"], backend=backend)
    y.backward(inp["dy"])                                        # only the normalized output
    xr = (inp["x"] + inp["r"]).double().requires_grad_()
    rms_norm_reference(xr, inp["w"].double()).backward(inp["dy"].double())
    assert err(x.grad, xr.grad) <= FP32_BUDGET and err(r.grad, xr.grad) <= FP32_BUDGET
    assert x.grad.data_ptr() != r.grad.data_ptr()                # two leaves never share a .grad


def test_non_contiguous_input_gives_the_same_result():
    w = torch.randn(37, device=DEVICE)
    for x in (torch.randn(37, 6, device=DEVICE).t(),             # (6, 37) with strides (1, 37)
              torch.randn(6, 74, device=DEVICE)[:, ::2]):        # (6, 37) with strides (74, 2)
        assert not x.is_contiguous()
        assert torch.equal(rms_norm(x, w, backend="triton"), rms_norm(x.contiguous(), w, backend="triton"))
    x, w2 = torch.randn(6, 37, device=DEVICE), torch.randn(74, device=DEVICE)[::2]        # a strided weight
    assert torch.equal(rms_norm(x, w2, backend="triton"), rms_norm(x, w2.contiguous(), backend="triton"))


def test_empty_input():
    x = torch.randn(2, 0, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend="triton")
    y.sum().backward()
    assert y.shape == (2, 0, 16) and torch.equal(w.grad, torch.zeros(16, device=DEVICE))


def test_backward_is_deterministic():
    inp = make_inputs((257, 300), torch.float32)
    a = forward_backward(inp, ours("triton", 1e-6))
    b = forward_backward(inp, ours("triton", 1e-6))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_triton_backend_really_runs_the_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("F.rms_norm called")

    monkeypatch.setattr(F, "rms_norm", refuse)
    x, w = torch.randn(3, 10, device=DEVICE), torch.ones(10, device=DEVICE)
    rms_norm(x, w, backend="triton")
    with pytest.raises(AssertionError, match="F.rms_norm called"):
        rms_norm(x, w, backend="torch")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(backend):
    x, w = torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(1, 8, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.to(torch.int64), w, backend=backend)
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, None, backend=backend)
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, w.to(torch.bfloat16), backend=backend)             # bf16 weights for fp32 x
    with pytest.raises(ValueError, match="residual"):
        rms_norm_residual(x, torch.randn(1, 2, 8, device=DEVICE), w, backend=backend)
    with pytest.raises(TypeError, match="residual"):
        rms_norm_residual(x, x.to(torch.int32), w, backend=backend)
    with pytest.raises(ValueError, match="different devices"):
        rms_norm_residual(x, x.to("meta"), w, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, eps=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, backend="Triton")


def test_triton_refuses_float64_and_too_wide_rows():
    x, w = torch.randn(2, 8, dtype=torch.float64, device=DEVICE), torch.ones(8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x, w, backend="triton")
    assert rms_norm(x, w, backend="torch").dtype == torch.float64     # the torch backend takes it
    n = MAX_WIDTH + 1
    with pytest.raises(ValueError, match="backend='torch'"):
        rms_norm(torch.randn(1, n, device=DEVICE), torch.ones(n, device=DEVICE), backend="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU refusal only applies without CUDA")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="interpreter"):
        rms_norm(x, w, backend="triton")
    assert rms_norm(x, w).shape == x.shape                        # "auto" picks torch on a CPU


# ----------------------------------------------------------------------------- cost model
def test_cost_model():
    m, n = 4096, 8192
    act = m * n * 2
    assert bytes_moved(m, n) == 2 * act + n * 2 + 4 * m
    assert bytes_moved(m, n, mode="bwd") == 3 * act + 2 * n * 2 + 4 * m
    assert bytes_moved(m, n, mode="fwd", residual=True) - bytes_moved(m, n) == 2 * act
    assert bytes_moved(m, n, mode="bwd", residual=True) - bytes_moved(m, n, mode="bwd") == act
    assert bytes_moved(m, n, dtype_bytes=4) > bytes_moved(m, n)
    for kw in ({}, {"residual": True}):
        assert bytes_moved(m, n, mode="fwd+bwd", **kw) == bytes_moved(m, n, **kw) + bytes_moved(m, n, mode="bwd", **kw)
        assert flops(m, n, mode="fwd+bwd", **kw) == flops(m, n, **kw) + flops(m, n, mode="bwd", **kw)
    assert flops(m, n) == 4 * m * n and flops(m, n, mode="bwd") == 9 * m * n
    with pytest.raises(ValueError, match="mode"):
        flops(m, n, mode="forward")


# ----------------------------------------------------------------------------- compiled for a GPU
def _compile_for_sm90(kernel, signature, constexprs, num_warps):
    """Compile a kernel to a cubin for sm_90 (H100/H200) on any machine, specializing the
    pointers and N as multiples of 16 where N is (the launcher's vectorized path). Returns
    the compiled kernel. Runs in a child process without the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = constexprs.pop("_ALIGNED")
    names = [k for k, v in signature.items() if v.startswith("*") or k == "N"] if aligned else []
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter is lax about types and shapes, the compiler is not: compile every
    kernel, as the launcher would configure it, down to a cubin for sm_90."""
    compile_in_subprocess(__file__, tmp_path)


def _compile_all():
    from compile_check import require_nvidia_compiler

    require_nvidia_compiler()
    for dtype, (m, n) in [("bf16", (4096, 16384)), ("fp16", (4096, 8192)), ("fp32", (3, 1000))]:
        t = "*" + dtype
        block_n, rows, warps = nc.launch_config(m, n)
        sig = dict(X=t, R=t, W=t, Y=t, H=t, RSTD="*fp32", M="i32", N="i32", eps="fp32",
                   HAS_RESIDUAL="constexpr", ROWS="constexpr", BLOCK_N="constexpr")
        _compile_for_sm90(rn._rms_norm_fwd_kernel, sig, dict(HAS_RESIDUAL=True, ROWS=rows, BLOCK_N=block_n,
                                                             _ALIGNED=n % 16 == 0), warps)
        block_n, rows, warps = nc.launch_config(m, n, backward=True)
        sig = dict(X=t, W="*fp32", RSTD="*fp32", DY=t, DH=t, DX=t, DW_PART="*fp32", M="i32", N="i32",
                   HAS_DH="constexpr", ROWS="constexpr", BLOCK_N="constexpr")
        for on in (True, False):
            k = _compile_for_sm90(rn._rms_norm_bwd_kernel, sig, dict(HAS_DH=on, ROWS=rows, BLOCK_N=block_n,
                                                                     _ALIGNED=n % 16 == 0), warps)
            assert k.metadata.shared <= 48 * 1024, k.metadata.shared  # only the reductions' scratch


# ----------------------------------------------------------------------------- GPU only
@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 123, 123), (2, 4097), (64, 8192), (4096, 16384)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_bf16_compiled_matches_float64_reference(shape, residual):
    check(shape, torch.bfloat16, residual=residual)
    check(shape, torch.bfloat16, residual=residual, weight_dtype=torch.float32)
