"""Fused linear cross-entropy (ltk/kernels/fused_linear_ce.py): the loss and the gradients of h,
W and bias against the float64 unfused formula, on odd N, d, V with chunks that do not divide
N, ignored rows and every option, fp32/fp16/bf16 under the interpreter and on the torch
backend; the (N, V) logits never exist on the torch path; the chunk rule; a tiny GPT trained
30 steps with the fused loss follows the full-logits loss. Budgets as
tests/kernels/test_cross_entropy.py (err = max|out − ref| / max|ref|)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ltk.kernels.fused_linear_ce import (
    DEFAULT_BUDGET,
    bytes_moved,
    choose_chunk_rows,
    flops,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_BUDGET = 1e-5
NAMES = ("loss", "dh", "dW", "db")


def err(out, ref) -> float:
    scale = ref.abs().max().item()
    diff = (out.double() - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def make(n, d, v, dtype, bias=True, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, sc=1.0, dt=dtype: (sc * torch.randn(*s, generator=g, dtype=torch.float64)).to(dt).to(DEVICE)  # noqa: E731
    h, w = rnd(n, d), rnd(v, d, sc=d ** -0.5 * 2, dt=w_dtype or dtype)
    b = rnd(v, sc=0.1, dt=w_dtype or dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[::7] = -100
    return h, w, b, y


def run(fn, h, w, b, y, opts, grad=0.75):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    loss = fn(leaves[0], leaves[1], y, leaves[2], **opts)
    loss.backward(torch.tensor(grad, dtype=loss.dtype, device=loss.device))
    return [loss.detach()] + [t.grad if t is not None else None for t in leaves]


def check(n, d, v, dtype, opts, backend="triton", bias=True, chunk_rows=8, w_dtype=None, seed=0):
    h, w, b, y = make(n, d, v, dtype, bias, seed, w_dtype)
    got = run(lambda *a, **k: fused_linear_cross_entropy(*a, backend=backend, chunk_rows=chunk_rows, **k),
              h, w, b, y, opts)
    ref = run(fused_linear_cross_entropy_reference, *(t.double() if t is not None else None for t in (h, w, b)),
              y, opts)
    base = run(lambda hh, ww, yy, bb, **k: fused_linear_cross_entropy_reference(hh, ww.to(hh.dtype), yy,
               None if bb is None else bb.to(hh.dtype), **k), h, w, b, y, opts)   # unfused, in the low dtype
    for name, o, r, bs, t in zip(NAMES, got, ref, base, (h, h, w, b)):
        if r is None:
            continue
        assert o.dtype == t.dtype and o.shape == r.shape, name
        e = err(o, r)
        budget = FP32_BUDGET if dtype == torch.float32 else 3 * err(bs, r) + torch.finfo(dtype).eps / 2
        assert math.isfinite(e) and e <= budget, f"{name}: err {e:.2e} > {budget:.2e} ({n}, {d}, {v}, {dtype}, {opts})"


OPTIONS = {"plain": {}, "all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0), "sum": dict(reduction="sum")}


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_matches_float64_reference(backend, opts):
    check(37, 24, 1003, torch.float32, opts, backend)               # chunks of 8: 37 = 4·8 + 5
    check(21, 16, 2011, torch.float32, opts, backend, bias=False, chunk_rows=5, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_low_precision_matches_float64_reference(backend, dtype):
    check(19, 24, 1003, dtype, OPTIONS["all"], backend)
    check(19, 24, 1003, dtype, {}, backend, w_dtype=torch.float32)  # fp32 master weights, half activations


@pytest.mark.parametrize("v", [50257, 32003])
def test_torch_path_at_real_vocabularies(v):
    check(5, 8, v, torch.float32, OPTIONS["all"], "torch", chunk_rows=2)


class LargestTensor(TorchDispatchMode):
    """The most elements any op's output had."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_torch_path_never_builds_the_full_logits():
    n, d, v = 64, 8, 1201
    h, w, b, y = make(n, d, v, torch.float32)
    h, w = h.requires_grad_(), w.requires_grad_()
    with LargestTensor() as seen:
        fused_linear_cross_entropy(h, w, y, memory_budget=16 * v * 12, backend="torch").backward()
    assert seen.most <= 16 * v < n * v                                # one chunk of 16 rows at most
    with LargestTensor() as unfused:
        F.cross_entropy(h @ w.t(), y).backward()
    assert unfused.most == n * v


def test_chunk_rule_and_mixed_inputs():
    assert choose_chunk_rows(8192, 128256, torch.float32, "torch") == DEFAULT_BUDGET // (128256 * 8) // 16 * 16
    assert choose_chunk_rows(8192, 128256, torch.bfloat16, "triton", memory_budget=2**30) == 4176
    assert choose_chunk_rows(10, 1000, torch.float32, "torch", memory_budget=1) == 1
    assert choose_chunk_rows(10, 1000, torch.float32, "torch") == 10
    h, w, _, y = make(2 * 5, 12, 97, torch.float32)
    a = fused_linear_cross_entropy(h.view(2, 5, 12), w, y.view(2, 5), chunk_rows=3)   # leading dims
    assert torch.allclose(a, fused_linear_cross_entropy_reference(h, w, y), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):                   # computes in bf16, as F.linear would
        c = fused_linear_cross_entropy(h.cpu(), w.cpu(), y.cpu())
        r = F.cross_entropy(F.linear(h.cpu(), w.cpu()).float(), y.cpu())
    assert c.dtype == torch.bfloat16 and abs(c.float() - r) < 2e-2


def test_bad_inputs_raise_naming_the_argument():
    h, w, b, y = make(6, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        fused_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(h, w.t(), y)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(h, w, y, b[:5])
    with pytest.raises(ValueError, match="target"):
        fused_linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(h, w, torch.full_like(y, 20))
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(h, w, y, chunk_rows=0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hh, ww, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_cost_model():
    n, d, v = 8192, 2048, 128256
    assert flops(n, d, v) == 6 * n * d * v + 13 * n * v
    assert flops(n, d, v, mode="fwd") + flops(n, d, v, mode="bwd") == flops(n, d, v)
    one, many = bytes_moved(n, d, v), bytes_moved(n, d, v, chunk_rows=256)
    assert many > one > 7 * n * v * 2                                  # chunks re-read W
    assert bytes_moved(n, d, v, mode="fwd") + bytes_moved(n, d, v, mode="bwd") == one


def test_tiny_gpt_trains_the_same_with_the_fused_loss():
    """30 AdamW steps of a tiny GPT: the fused loss (h = the final hidden state, W = the tied
    embedding) against F.cross_entropy on the full logits, from the same weights and data."""
    from ltk.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32, backend="torch")
    torch.manual_seed(0)
    data = (torch.randint(0, 97, (30, 4, 1)) + torch.arange(17)) % 97    # counting sequences: learnable

    def train(fused: bool) -> list[float]:
        torch.manual_seed(1)
        model = GPT(cfg)
        if fused:
            model.lm_head = torch.nn.Identity()                         # the model returns h; W stays tied (wte)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for batch in data:
            x, y = batch[:, :-1], batch[:, 1:]
            out = model(x)                                              # (B, T, C) or (B, T, V)
            if fused:
                loss = fused_linear_cross_entropy(out.reshape(-1, 32), model.wte.weight, y.reshape(-1), chunk_rows=24)
            else:
                loss = F.cross_entropy(out.reshape(-1, 97), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    full, fused = train(False), train(True)
    assert full[-1] < full[0] - 1.0                                     # it learns
    assert max(abs(a - b) / a for a, b in zip(full, fused)) < 1e-4
