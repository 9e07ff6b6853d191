"""Cross-entropy with the gradient in place of the logits (ltk/kernels/cross_entropy.py): the loss
and the logits' gradient of the triton backend (the interpreter on a CPU) and of the torch
backend against the float64 reference, on odd N and V, with ignored rows and every option;
the in-place contract; bad input; the cost model.

Error measure and budgets as tests/kernels/test_rmsnorm.py: err = max|out − ref| / max|ref|;
fp32 ≤ 1e-5; fp16/bf16 ≤ 3 × the err of the reference formula run in that dtype (PyTorch's
own F.cross_entropy on low-precision logits) + half an ulp of the dtype. NaN never passes;
the loss buffer the kernel writes starts as NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from compile_check import compile_in_subprocess, poison_outputs

import ltk.kernels.cross_entropy as ce
from ltk.kernels.cross_entropy import bytes_moved, cross_entropy, cross_entropy_reference, flops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_BUDGET = 1e-5
LOW_PRECISION_FACTOR = 3.0
OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "z-loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=3.0),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0),
}


def err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    diff = (out.double() - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def make(n, v, dtype, seed=0, ignore=(1, 4)):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[[i for i in ignore if i < n]] = -100
    dout = torch.randn(n, generator=g, dtype=torch.float64)
    return x, y, dout


def run(fn, x, y, dout, opts):
    """Loss and logits gradient of fn on a fresh copy of x (fn may overwrite it)."""
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf * 1, y, **opts)                   # a non-leaf: the op may write its gradient over it
    g = dout.to(loss.dtype).to(loss.device) if opts.get("reduction") == "none" else dout[0].to(loss.dtype)
    loss.backward(g)
    return loss.detach(), leaf.grad


def check(n, v, dtype, opts, backend="triton", seed=0):
    x, y, dout = make(n, v, dtype, seed)
    with poison_outputs(ce):
        got = run(lambda *a, **k: cross_entropy(*a, backend=backend, **k), x, y, dout, opts)
    ref = run(cross_entropy_reference, x.double(), y, dout, opts)
    base = run(cross_entropy_reference, x, y, dout, opts)   # the formula in the low dtype: PyTorch's own error
    for name, o, r, b in zip(("loss", "dlogits"), got, ref, base):
        assert o.dtype == x.dtype and o.shape == r.shape
        e = err(o, r)
        if dtype == torch.float32:
            budget = FP32_BUDGET
        else:
            budget = LOW_PRECISION_FACTOR * err(b, r) + torch.finfo(dtype).eps / 2
        assert math.isfinite(e) and e <= budget, f"{name}: err {e:.2e} > {budget:.2e} ({n}, {v}, {dtype}, {opts})"


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_triton_fp32_matches_float64_reference(opts):
    check(13, 1003, torch.float32, opts)
    if opts is OPTIONS["all"]:
        check(6, 2011, torch.float32, opts, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("opts", ["plain", "all", "none"])
def test_triton_low_precision_matches_float64_reference(dtype, opts):
    check(11, 1003, dtype, OPTIONS[opts])


def test_triton_rows_wider_than_one_block():
    """V > MAX_BLOCK: the online max/sum walks several pieces of a row."""
    check(3, ce.MAX_BLOCK + 905, torch.float32, OPTIONS["all"])
    check(3, 1, torch.float32, {})                               # V = 1: the loss is 0, so is the gradient


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_torch_backend_matches_float64_reference(opts):
    check(13, 1003, torch.float32, opts, backend="torch")


@pytest.mark.parametrize("v", [50257, 32003])
def test_torch_backend_at_real_vocabularies(v, monkeypatch):
    monkeypatch.setattr(ce, "TORCH_CHUNK_BYTES", 3 * 8 * v)      # 3-row chunks: 5 rows do not divide
    check(5, v, torch.float32, OPTIONS["all"], backend="torch")
    check(5, v, torch.bfloat16, {}, backend="torch")


def test_float64_on_the_torch_backend():
    x, y, dout = make(7, 50, torch.float64)
    got = run(lambda *a, **k: cross_entropy(*a, backend="torch", **k), x, y, dout, OPTIONS["all"])
    ref = run(cross_entropy_reference, x, y, dout, OPTIONS["all"])
    assert err(got[0], ref[0]) < 1e-12 and err(got[1], ref[1]) < 1e-12


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logits_are_overwritten_with_their_gradient(backend):
    x, y, _ = make(5, 40, torch.float32)
    x = x.requires_grad_()
    logits = x * 2                                               # (5, 40), not a leaf
    before = logits.detach().clone()
    loss = cross_entropy(logits, y, backend=backend)
    loss.backward()
    x2 = before.clone().requires_grad_()
    cross_entropy_reference(x2, y).backward()
    assert torch.allclose(logits.detach(), x2.grad, atol=1e-7)   # the buffer now holds dlogits
    assert torch.allclose(x.grad, 2 * x2.grad, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_false_and_no_grad_leave_the_logits(backend):
    x, y, _ = make(5, 40, torch.float32)
    logits = x.clone().requires_grad_()
    cross_entropy(logits, y, backend=backend, inplace=False).backward()
    assert torch.equal(logits.detach(), x)
    assert err(logits.grad, torch.func.grad(lambda t: cross_entropy_reference(t, y))(x.double())) < FP32_BUDGET
    frozen = x.clone()
    loss = cross_entropy(frozen, y, backend=backend)             # no grad needed: only read
    assert torch.equal(frozen, x) and torch.allclose(loss, F.cross_entropy(x, y))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_graph_that_saved_the_logits_errors_instead_of_a_wrong_gradient(backend):
    x, y, _ = make(4, 30, torch.float32)
    x = x.requires_grad_()
    logits = torch.tanh(x)                                       # tanh saves its output for the backward
    loss = cross_entropy(logits, y, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_leading_dims_all_ignored_and_second_backward(backend):
    x, y, _ = make(6, 30, torch.float32)
    logits = x.view(2, 3, 30).clone().requires_grad_()
    rows = cross_entropy(logits * 1, y.view(2, 3), reduction="none", backend=backend)
    assert rows.shape == (2, 3) and torch.equal(rows.view(-1)[[1, 4]], torch.zeros(2))
    ignored = torch.full((6,), -100, device=DEVICE)
    leaf = x.clone().requires_grad_()
    loss = cross_entropy(leaf * 1, ignored, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(leaf.grad, torch.zeros_like(x))   # as torch's F.cross_entropy
    loss = cross_entropy(leaf * 1, y, backend=backend)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(backend):
    x, y = torch.randn(4, 10, device=DEVICE), torch.tensor([1, 2, 3, 4], device=DEVICE)
    with pytest.raises(ValueError, match="target"):
        cross_entropy(x, y[:3], backend=backend)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(x, torch.tensor([1, 2, 3, 10], device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="target"):
        cross_entropy(x, y.float(), backend=backend)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(x.long(), y, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, y, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, y, label_smoothing=1.5, backend=backend)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(x, y, softcap=0.0, backend=backend)
    with pytest.raises(ValueError, match="z_loss"):
        cross_entropy(x, y, z_loss=-1.0, backend=backend)


def test_cost_model():
    r, v = 8192, 128256
    assert bytes_moved(r, v, mode="fwd") == r * v * 2 + 12 * r
    assert bytes_moved(r, v) == 5 * r * v * 2 + 12 * r
    assert bytes_moved(r, v, dtype_bytes=4) > bytes_moved(r, v)
    assert flops(r, v, mode="fwd") == 5 * r * v and flops(r, v, softcap=True) > flops(r, v)
    with pytest.raises(ValueError, match="mode"):
        flops(r, v, mode="forward")


def test_kernel_compiles_for_a_gpu(tmp_path):
    compile_in_subprocess(__file__, tmp_path)


def _compile_all():
    from compile_check import require_nvidia_compiler

    GPUTarget, ASTSource = require_nvidia_compiler()
    import triton

    for dtype, v, cap in (("bf16", 128256, True), ("fp32", 1003, False)):
        block, warps = ce.launch_config(v)
        sig = dict(X="*" + dtype, stride="i64", Y="*i64", LOSS="*fp32", V="i32", ignore_index="i32",
                   smoothing="fp32", z_loss="fp32", softcap="fp32", scale="fp32",
                   HAS_SOFTCAP="constexpr", WRITE_GRAD="constexpr", BLOCK="constexpr")
        src = ASTSource(fn=ce._ce_kernel, signature=sig, constexprs=dict(HAS_SOFTCAP=cap, WRITE_GRAD=True, BLOCK=block))
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
