"""LayerNorm kernels (ltk/kernels/layernorm.py): the output and every gradient of the triton
backend (compiled on CUDA, the interpreter on a CPU) and of the torch backend against the
float64 reference, on odd shapes and fuzzed ones; bad input; the cost model.

Error measure: err(out, ref) = max|out − ref| / max(max|ref|, T), per tensor (y, h, dx,
d(residual), dw, db), with ref computed in float64 from the same (rounded) inputs, and T the
size of the terms the output is computed from (`term_scales`: max|rstd · dy ∘ w| for dx,
max_j Σ_rows |dy ∘ x̂| for dw, ...). Rounding error scales with the terms, not with the
result; the two are of the same order except where the terms cancel (widths 1-2, a few rows
of random-sign dy), and there max|ref| alone would call noise a failure.

Budget (the design notes, "how close is close enough"): fp32 ≤ 1e-5, or ≤ 3 × PyTorch's own
fp32 err where even that is larger (LayerNorm of two nearly equal values, where x − μ
cancels); fp16/bf16 ≤ 3 × the err of PyTorch's own op (F.layer_norm) run in that dtype on
the same inputs, + half an ulp of the dtype (no output is closer than its own rounding). NaN
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

import ltk.kernels.layernorm as ln
import ltk.kernels.norm_common as nc
from ltk.kernels.layernorm import bytes_moved, flops, layer_norm, layer_norm_reference, layer_norm_residual

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


def make_inputs(shape, dtype, *, bias=True, residual=False, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rnd(*s, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dt).to(DEVICE)

    wdt = weight_dtype or dtype
    return dict(
        x=rnd(*shape), r=rnd(*shape) if residual else None,
        w=rnd(n, dt=wdt, scale=0.5, shift=1.0), b=rnd(n, dt=wdt, scale=0.5) if bias else None,
        dy=rnd(*shape), dh=rnd(*shape) if residual else None,
    )


def forward_backward(inp, fn):
    """Run fn(x, r, w, b) -> (y, h or None) with fresh leaves; return outputs and gradients."""
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "r", "w", "b") if inp[k] is not None}
    y, h = fn(leaves["x"], leaves.get("r"), leaves["w"], leaves.get("b"))
    outs, grads = [y], [inp["dy"]]
    if h is not None:
        outs.append(h)
        grads.append(inp["dh"])
    torch.autograd.backward(outs, grads)
    res = {"y": y.detach(), "dx": leaves["x"].grad, "dw": leaves["w"].grad}
    if h is not None:
        res.update(h=h.detach(), dr=leaves["r"].grad)
    if "b" in leaves:
        res["db"] = leaves["b"].grad
    return res


def ours(backend, eps):
    def fn(x, r, w, b):
        if r is None:
            return layer_norm(x, w, b, eps, backend=backend), None
        return layer_norm_residual(x, r, w, b, eps, backend=backend)
    return fn


def reference(eps):
    def fn(x, r, w, b):
        h = x + r if r is not None else None
        return layer_norm_reference(h if h is not None else x, w, b, eps), h
    return fn


def pytorch_op(eps):
    """PyTorch's own op in the inputs' dtype: the yardstick of the low-precision budget."""
    def fn(x, r, w, b):
        h = x + r if r is not None else None
        return F.layer_norm(h if h is not None else x, (x.shape[-1],), w.to(x.dtype),
                            None if b is None else b.to(x.dtype), eps), h
    return fn


def term_scales(inp, h, eps):
    """How large the terms are that each output is computed from (float64): rounding error
    scales with them, and can dwarf the result where the terms cancel."""
    dy, w = inp["dy"].double(), inp["w"].double()
    mean = h.mean(dim=-1, keepdim=True)
    rstd = (h.var(dim=-1, unbiased=False, keepdim=True) + eps).rsqrt()
    per_col = lambda t: t.reshape(-1, t.shape[-1]).abs().sum(0).max().item()  # max_j Σ_rows |t_ij|
    s = dict(y=(h.abs().amax(dim=-1, keepdim=True) * rstd * w.abs()).max().item(),  # x·rstd·w, μ·rstd·w
             dx=(rstd * dy * w).abs().max().item(),                                   # rstd·g
             dw=per_col(dy * (h - mean) * rstd), db=per_col(dy), h=0.0)
    s["dr"] = s["dx"]
    return s


def check(shape, dtype, *, backend="triton", bias=True, residual=False, eps=1e-5, weight_dtype=None, seed=0):
    inp = make_inputs(shape, dtype, bias=bias, residual=residual, weight_dtype=weight_dtype, seed=seed)
    with poisoned(ln):
        got = forward_backward(inp, ours(backend, eps))
    ref = forward_backward({k: None if v is None else v.double() for k, v in inp.items()}, reference(eps))
    base = forward_backward(inp, pytorch_op(eps))
    assert got.keys() == ref.keys()
    scales = term_scales(inp, ref["h"] if residual else inp["x"].double(), eps)
    errors = {}
    for k in ref:
        assert got[k].shape == ref[k].shape
        assert got[k].dtype == (inp["w"].dtype if k in ("dw", "db") else inp["x"].dtype)
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
@pytest.mark.parametrize("shape", [(5, 123, 123), (2, 4097)], ids=str)
def test_triton_without_bias(shape, dtype):
    errors = check(shape, dtype, bias=False, residual=False)
    assert "db" not in errors
    check(shape, dtype, bias=False, residual=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_torch_backend_matches_float64_reference(dtype, residual, bias):
    for shape in [(3, 41, 123), (3, 7), (2, 9001)]:
        check(shape, dtype, backend="torch", bias=bias, residual=residual)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_weights_with_fp16_activations(backend):
    check((4, 33, 257), torch.float16, backend=backend, residual=True, weight_dtype=torch.float32)
    x = torch.randn(3, 8, dtype=torch.float16, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, None, backend=backend)
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
    b = torch.randn(40, device=DEVICE)
    dy, dh = torch.randn(5, 40, device=DEVICE), torch.randn(5, 40, device=DEVICE)
    y, h = layer_norm_residual(x, r, w, b, backend=backend)
    assert y.dtype == h.dtype == torch.float32
    torch.autograd.backward([y, h], [dy, dh])
    assert x.grad.dtype == torch.float16 and r.grad.dtype == torch.float32
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y64 = layer_norm_reference(x64 + r64, w.double(), b.double())
    torch.autograd.backward([y64, x64 + r64], [dy.double(), dh.double()])
    assert err(y, y64) <= FP32_BUDGET and err(h, x64 + r64) <= FP32_BUDGET and err(r.grad, r64.grad) <= FP32_BUDGET
    assert err(x.grad, x64.grad) <= torch.finfo(torch.float16).eps / 2        # fp16 rounding of the fp32 gradient


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), width=st.integers(1, 2100), dtype=st.sampled_from([torch.float32, torch.float16]),
       eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]), bias=st.booleans(), residual=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzzed_shapes(rows, width, dtype, eps, bias, residual, seed):
    check((rows, width), dtype, bias=bias, residual=residual, eps=eps, seed=seed)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_residual_gradients_when_only_one_output_is_used(backend):
    inp = make_inputs((6, 50), torch.float32, residual=True)
    x, r = (inp[k].clone().requires_grad_() for k in ("x", "r"))
    y, h = layer_norm_residual(x, r, inp["w"], inp["b"], backend=backend)
    h.backward(inp["dh"])                                        # only the residual stream
    assert torch.equal(x.grad, inp["dh"]) and torch.equal(r.grad, inp["dh"])
    x.grad = r.grad = None
    y, h = layer_norm_residual(x, r, inp["w"], inp["b"], backend=backend)
    y.backward(inp["dy"])                                        # only the normalized output
    xr = (inp["x"] + inp["r"]).double().requires_grad_()
    layer_norm_reference(xr, inp["w"].double(), inp["b"].double()).backward(inp["dy"].double())
    assert err(x.grad, xr.grad) <= FP32_BUDGET and err(r.grad, xr.grad) <= FP32_BUDGET
    assert x.grad.data_ptr() != r.grad.data_ptr()                # two leaves never share a .grad


def test_non_contiguous_input_gives_the_same_result():
    w, b = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)
    for x in (torch.randn(37, 6, device=DEVICE).t(),             # (6, 37) with strides (1, 37)
              torch.randn(6, 74, device=DEVICE)[:, ::2]):        # (6, 37) with strides (74, 2)
        assert not x.is_contiguous()
        assert torch.equal(layer_norm(x, w, b, backend="triton"), layer_norm(x.contiguous(), w, b, backend="triton"))
    x = torch.randn(6, 37, device=DEVICE)
    w2, b2 = torch.randn(74, device=DEVICE)[::2], torch.randn(74, device=DEVICE)[1::2]  # strided parameters
    assert torch.equal(layer_norm(x, w2, b2, backend="triton"), layer_norm(x, w2.contiguous(), b2.contiguous(),
                                                                           backend="triton"))


def test_empty_input():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, None, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=DEVICE))


def test_backward_is_deterministic():
    inp = make_inputs((257, 300), torch.float32)
    a = forward_backward(inp, ours("triton", 1e-5))
    b = forward_backward(inp, ours("triton", 1e-5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_triton_backend_really_runs_the_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("F.layer_norm called")

    monkeypatch.setattr(F, "layer_norm", refuse)
    x, w = torch.randn(3, 10, device=DEVICE), torch.ones(10, device=DEVICE)
    layer_norm(x, w, None, backend="triton")
    with pytest.raises(AssertionError, match="F.layer_norm called"):
        layer_norm(x, w, None, backend="torch")


# ----------------------------------------------------------------------------- bad input
def _args(n=8, dtype=torch.float32):
    return (torch.randn(2, n, dtype=dtype, device=DEVICE), torch.ones(n, dtype=dtype, device=DEVICE),
            torch.zeros(n, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(backend):
    x, w, b = _args()
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(7, device=DEVICE), b, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, torch.ones(2, 8, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="x"):
        layer_norm(x.to(torch.int32), w, b, backend=backend)
    with pytest.raises(TypeError, match="x"):
        layer_norm(x.tolist(), w, b, backend=backend)
    with pytest.raises(TypeError, match="weight"):
        layer_norm(x, w.to(torch.float16), b, backend=backend)       # fp16 weights for fp32 x
    with pytest.raises(TypeError, match="bias"):
        layer_norm(x.half(), w.half(), b, backend=backend)           # bias dtype ≠ weight dtype
    with pytest.raises(ValueError, match="residual"):
        layer_norm_residual(x, torch.randn(2, 9, device=DEVICE), w, b, backend=backend)
    with pytest.raises(TypeError, match="residual"):
        layer_norm_residual(x, x.to(torch.int32), w, b, backend=backend)
    with pytest.raises(ValueError, match="different devices"):
        layer_norm(x, w.to("meta"), b, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, b, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="x"):
        layer_norm(torch.tensor(1.0), torch.ones(1), None, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        layer_norm(x, w, b, backend="cuda")


def test_triton_refuses_float64_and_too_wide_rows():
    x, w, b = _args(dtype=torch.float64)
    with pytest.raises(TypeError, match="x"):
        layer_norm(x, w, b, backend="triton")
    assert layer_norm(x, w, b, backend="torch").dtype == torch.float64   # the torch backend takes it
    n = nc.MAX_WIDTH + 1
    with pytest.raises(ValueError, match="backend='torch'"):
        layer_norm(torch.randn(1, n, device=DEVICE), torch.ones(n, device=DEVICE), None, backend="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU refusal only applies without CUDA")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = _args()
    with pytest.raises(ValueError, match="interpreter"):
        layer_norm(x, w, b, backend="triton")
    assert layer_norm(x, w, b).shape == x.shape                   # "auto" picks torch on a CPU


def test_launch_configuration(monkeypatch):
    """Whole rows in one block; short rows packed; the GPU backward grid a few programs per SM."""
    for m, n in [(1, 1), (3, 7), (4096, 768), (4096, 8192), (4096, 16384), (2, nc.MAX_WIDTH)]:
        for backward in (False, True):
            block_n, rows, warps = nc.launch_config(m, n, backward=backward)
            assert block_n >= n and block_n & (block_n - 1) == 0 and block_n < 2 * n + 1
            assert rows * block_n <= max(nc.TILE, block_n) and rows <= max(1, 2 * m)
            assert warps in (4, 8, 16, 32)
    assert nc.launch_config(4096, 128)[1] == 32                  # 32 rows of 128 a program
    monkeypatch.setattr(nc, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    for m, n in [(4096, 16384), (4096, 8192), (65536, 768), (8, 4096)]:
        p = nc.bwd_programs(m, n, cuda)
        _, rows, _ = nc.launch_config(m, n, backward=True)
        assert 1 <= p <= min(4 * 132, -(-m // rows))              # never an idle program
        assert p >= min(132, -(-m // rows))                       # every SM busy when there is work
    assert nc.bwd_programs(4096, 16384, cuda) == 132             # ~31 rows each, partials ~4% extra
    assert nc.bwd_programs(10, 10, torch.device("cpu")) == 1


# ----------------------------------------------------------------------------- cost model
def test_cost_model():
    m, n = 4096, 16384
    act = m * n * 2
    assert bytes_moved(m, n) == 2 * act + 2 * n * 2 + 8 * m
    assert bytes_moved(m, n, mode="bwd") == 3 * act + 3 * n * 2 + 8 * m
    assert bytes_moved(m, n, mode="fwd", residual=True) - bytes_moved(m, n) == 2 * act
    assert bytes_moved(m, n, mode="bwd", residual=True) - bytes_moved(m, n, mode="bwd") == act
    assert bytes_moved(m, n, dtype_bytes=4) > bytes_moved(m, n)
    for kw in ({}, {"residual": True}):
        assert bytes_moved(m, n, mode="fwd+bwd", **kw) == bytes_moved(m, n, **kw) + bytes_moved(m, n, mode="bwd", **kw)
        assert flops(m, n, mode="fwd+bwd", **kw) == flops(m, n, **kw) + flops(m, n, mode="bwd", **kw)
    assert flops(m, n) == 7 * m * n and flops(m, n, mode="bwd") == 13 * m * n
    with pytest.raises(ValueError, match="mode"):
        bytes_moved(m, n, mode="backward")


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
    for dtype, (m, n) in [("bf16", (4096, 16384)), ("fp16", (4096, 768)), ("fp32", (3, 1000))]:
        t = "*" + dtype
        block_n, rows, warps = nc.launch_config(m, n)
        sig = dict(X=t, R=t, W="*fp32", B="*fp32", Y=t, H=t, MEAN="*fp32", RSTD="*fp32", M="i32", N="i32",
                   eps="fp32", HAS_RESIDUAL="constexpr", HAS_BIAS="constexpr", ROWS="constexpr", BLOCK_N="constexpr")
        _compile_for_sm90(ln._layer_norm_fwd_kernel, sig, dict(HAS_RESIDUAL=True, HAS_BIAS=True, ROWS=rows,
                                                               BLOCK_N=block_n, _ALIGNED=n % 16 == 0), warps)
        block_n, rows, warps = nc.launch_config(m, n, backward=True)
        sig = dict(X=t, W=t, MEAN="*fp32", RSTD="*fp32", DY=t, DH=t, DX=t, DW_PART="*fp32", DB_PART="*fp32",
                   M="i32", N="i32", HAS_DH="constexpr", HAS_BIAS="constexpr", ROWS="constexpr", BLOCK_N="constexpr")
        for on in (True, False):
            k = _compile_for_sm90(ln._layer_norm_bwd_kernel, sig, dict(HAS_DH=on, HAS_BIAS=on, ROWS=rows,
                                                                       BLOCK_N=block_n, _ALIGNED=n % 16 == 0), warps)
            assert k.metadata.shared <= 48 * 1024, k.metadata.shared  # only the reductions' scratch


# ----------------------------------------------------------------------------- GPU only
@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 123, 123), (2, 4097), (64, 8192), (4096, 16384)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_bf16_compiled_matches_float64_reference(shape, residual):
    check(shape, torch.bfloat16, residual=residual)
    check(shape, torch.bfloat16, residual=residual, weight_dtype=torch.float32)
