"""RoPE kernel (ltk/kernels/rope.py): q', k' and both gradients of the triton backend (the
interpreter on a CPU) against the float64 reference, with GQA head counts, head dims 64 and 80,
T = 37, positions from an offset, per-sequence cos/sin, the models' strided (B, T, H, D) views,
fp32/fp16/bf16, in place and not; the torch backend is the models' reference bit for bit; the
in-place backward never overwrites a gradient someone else holds; bad input; the cost model; the
kernel compiled for sm_90a and sm_80.

Error measure: err = max|out − ref| / max|input| per tensor (the rotation keeps each pair's norm,
so the input's size is the terms' size; q' and k' can cancel to ~0 in places). Budget as
tests/kernels/test_rmsnorm.py: fp32 ≤ 1e-5; fp16/bf16 ≤ 3 × the err of the eager reference in
that dtype + half an ulp. Every buffer the kernel writes starts as NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
from compile_check import compile_in_subprocess, poison_outputs

import ltk.kernels.rope as rp
from ltk.kernels.rope import apply_rope, bytes_moved, flops, rope_reference
from ltk.models.llama import rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_BUDGET = 1e-5
LOW_PRECISION_FACTOR = 3.0


def err(out: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    return (out.double() - ref).abs().max().item() / scale


def make(B, hq, hk, T, D, dtype, *, layout="bthd", cos_kind="shared", start=0, seed=0):
    """q (B, hq, T, D), k (B, hk, T, D) in the models' layout (transposed views of (B, T, H, D)) or
    contiguous; cos, sin (T, D) ("shared"), (B, T, D) or (B, 1, T, D) for per-sequence positions."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    if layout == "bthd":
        q, k = rnd(B, T, hq, D).transpose(1, 2), rnd(B, T, hk, D).transpose(1, 2)
    else:
        q, k = rnd(B, hq, T, D), rnd(B, hk, T, D)
    if cos_kind == "shared":
        pos = torch.arange(start, start + T)                                   # (T,)
    else:                                                                       # each sequence its own offset
        pos = torch.arange(T)[None] + torch.tensor([start, 3 * start + 5])[:B, None]
    cos, sin = rope_cos_sin(pos.to(DEVICE), D, 10000.0)                         # (T, D) or (B, T, D) fp32
    if cos_kind == "b1td":
        cos, sin = cos[:, None], sin[:, None]
    return q, k, cos, sin, rnd(*q.shape), rnd(*k.shape)


def run(q, k, cos, sin, dq, dk, *, backend, inplace=False):
    """(q', k', dq, dk) with q, k entering the op as non-leaf tensors (in place needs that), the
    upstream gradients passed as copies (the caller's stay intact)."""
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qi, ki = ql.clone(), kl.clone()                                             # same strides, not leaves
    qo, ko = apply_rope(qi, ki, cos, sin, inplace=inplace, backend=backend)
    if inplace:
        assert qo is qi and ko is ki
    torch.autograd.backward([qo, ko], [dq.clone(), dk.clone()])
    return qo.detach(), ko.detach(), ql.grad, kl.grad


def reference(q, k, cos, sin, dq, dk):
    """The float64 reference (and, in the inputs' dtype, eager PyTorch)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = rope_reference(ql, cos.to(q.dtype), sin.to(q.dtype)), rope_reference(kl, cos.to(q.dtype), sin.to(q.dtype))
    torch.autograd.backward([qo, ko], [dq, dk])
    return qo.detach(), ko.detach(), ql.grad, kl.grad


def check(B, hq, hk, T, D, dtype, **kw):
    inplace = kw.pop("inplace", False)
    q, k, cos, sin, dq, dk = make(B, hq, hk, T, D, dtype, **kw)
    with poison_outputs(rp):
        got = run(q, k, cos, sin, dq, dk, backend="triton", inplace=inplace)
    ref = reference(*(t.double() for t in (q, k, cos, sin, dq, dk)))
    eager = reference(q, k, cos, sin, dq, dk)
    scales = [q.abs().max().item(), k.abs().max().item(), dq.abs().max().item(), dk.abs().max().item()]
    for name, g, r, e, s, like in zip(("q'", "k'", "dq", "dk"), got, ref, eager, scales, (q, k, q, k)):
        assert g.shape == r.shape and g.dtype == dtype, name
        if name in ("q'", "k'"):
            assert g.stride() == like.stride(), name                          # the caller's layout carries through
        budget = FP32_BUDGET if dtype == torch.float32 else \
            LOW_PRECISION_FACTOR * err(e, r, s) + torch.finfo(dtype).eps / 2
        e_ = err(g, r, s)
        assert math.isfinite(e_) and e_ <= budget, f"{name}: err {e_:.2e} > {budget:.2e} ({dtype}, {kw})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_triton_matches_float64_reference(dtype, inplace):
    """GQA 6/2 heads, D = 80, T = 37 from position 100, the models' strided layout."""
    check(2, 6, 2, 37, 80, dtype, start=100, inplace=inplace)


@pytest.mark.parametrize("cos_kind", ["btd", "b1td"])
def test_per_sequence_positions(cos_kind):
    """cos/sin per sequence (a decode offset each, packed rows): (B, T, D) and (B, 1, T, D)."""
    check(2, 4, 4, 37, 64, torch.float32, cos_kind=cos_kind, start=7, inplace=cos_kind == "btd")


def test_any_cos_and_sin_not_only_rotations():
    """cos and sin whose halves differ (no rotation): the kernel computes x∘cos + rotate_half(x)∘sin
    and its exact transpose, as the reference, for whatever it is given."""
    q, k, cos, sin, dq, dk = make(2, 2, 1, 6, 16, torch.float32, seed=5)
    gen = torch.Generator().manual_seed(6)
    cos, sin = torch.randn(6, 16, generator=gen).to(DEVICE), torch.randn(6, 16, generator=gen).to(DEVICE)
    got = run(q, k, cos, sin, dq, dk, backend="triton")
    ref = reference(*(t.double() for t in (q, k, cos, sin, dq, dk)))
    for g, r in zip(got, ref):
        assert err(g, r, r.abs().max().item()) <= FP32_BUDGET


def test_int64_offsets_give_the_same_result(monkeypatch):
    """The int64 path of tiles whose offsets could pass 2**31 (forced here on small tensors)."""
    q, k, cos, sin, _, _ = make(2, 4, 2, 9, 16, torch.float32)
    expected = apply_rope(q, k, cos, sin, backend="triton")
    monkeypatch.setattr(rp, "INT32_REACH", 1)
    for a, b in zip(apply_rope(q, k, cos, sin, backend="triton"), expected):
        assert torch.equal(a, b)


def test_contiguous_layout_and_multi_query():
    check(1, 3, 1, 5, 64, torch.float16, layout="bhtd", seed=3)


def test_torch_backend_is_the_models_reference_bit_for_bit():
    q, k, cos, sin, _, _ = make(2, 4, 2, 9, 16, torch.float32)
    qo, ko = apply_rope(q, k, cos, sin, backend="torch")
    assert torch.equal(qo, rope_reference(q, cos, sin)) and torch.equal(ko, rope_reference(k, cos, sin))
    qi, ki = q.clone(), k.clone()
    out = apply_rope(qi, ki, cos, sin, inplace=True, backend="torch")
    assert out[0] is qi and torch.equal(qi, qo) and torch.equal(ki, ko)


def test_inplace_backward_overwrites_only_gradients_nobody_else_holds(monkeypatch):
    """The backward rotates dq, dk in place when autograd alone holds them (here: fresh from the
    product after RoPE) and into new tensors when the caller holds them (autograd.backward's)."""
    q, k, cos, sin, dq, dk = make(1, 2, 1, 5, 16, torch.float32)
    reused = []
    launch = rp._launch

    def spy(q_, k_, qo, ko, *args, **kw):
        if kw.get("backward"):
            reused.append(qo is q_ and (k_ is None or ko is k_))
        return launch(q_, k_, qo, ko, *args, **kw)
    monkeypatch.setattr(rp, "_launch", spy)
    qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = apply_rope(qi * 1, ki * 1, cos, sin, inplace=True, backend="triton")
    ((qo * 2).sum() + (ko * 2).sum()).backward()                 # gradients made by autograd alone
    held = dq.clone()
    qo, ko = apply_rope(qi * 1, ki * 1, cos, sin, inplace=True, backend="triton")
    torch.autograd.backward([qo, ko], [held, dk])                # gradients the caller holds
    assert reused == [True, True, False, False]                  # a launch each for q and k in place
    assert torch.equal(held, dq)                                 # the caller's gradient is intact
    qo, ko = apply_rope(qi * 1, ki * 1, cos, sin, backend="triton")
    ((qo * 2).sum() + (ko * 2).sum()).backward()
    assert reused[-1] is False and len(reused) == 5              # out of place: one launch, never in place


def test_unused_output_gets_no_gradient_work():
    q, k, cos, sin, dq, _ = make(1, 2, 2, 5, 16, torch.float32)
    ql = q.clone().requires_grad_()
    kl = k.clone().requires_grad_()
    qo, _ = apply_rope(ql, kl, cos, sin, backend="triton")
    qo.backward(dq)
    ref = reference(q.double(), k.double(), cos.double(), sin.double(), dq.double(), torch.zeros_like(k).double())
    assert err(ql.grad, ref[2], 1.0) <= FP32_BUDGET and kl.grad is None


def test_bad_inputs_raise_naming_the_problem():
    q, k, cos, sin, _, _ = make(2, 4, 2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of k's 3"):
        apply_rope(q, torch.randn(2, 3, 5, 16), cos, sin, backend="triton")
    with pytest.raises(ValueError, match="batch, time and head_dim"):
        apply_rope(q, k[:, :, :4], cos, sin, backend="triton")
    with pytest.raises(ValueError, match="even"):
        apply_rope(q[..., :15], k[..., :15], cos[:, :15], sin[:, :15], backend="triton")
    with pytest.raises(ValueError, match=r"\(T, D\), \(B, T, D\) or \(B, 1, T, D\)"):
        apply_rope(q, k, cos[:4], sin[:4], backend="triton")
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rope(q, k, cos, sin[None], backend="triton")
    with pytest.raises(ValueError, match="constants"):
        apply_rope(q, k, cos.requires_grad_(), sin, backend="triton")
    with pytest.raises(ValueError, match="shape \\(batch, heads, time, head_dim\\)"):
        apply_rope(q[0], k, cos, sin, backend="torch")
    with pytest.raises(ValueError, match="same memory"):
        apply_rope(q, q, cos.detach(), sin, inplace=True, backend="triton")
    with pytest.raises(ValueError, match="share memory"):
        apply_rope(q[:, :1].expand(2, 4, 5, 16), k, cos.detach(), sin, inplace=True, backend="triton")
    with pytest.raises(TypeError, match="q"):
        apply_rope(q.double(), k, cos.detach(), sin, backend="triton")


def test_cost_model():
    B, hq, hk, T, D = 4, 32, 8, 4096, 128
    act = B * (hq + hk) * T * D * 2
    assert bytes_moved(B, hq, hk, T, D) == 2 * act + 2 * T * D * 2
    assert bytes_moved(B, hq, hk, T, D, cos_bytes=4, cos_batch=B, mode="bwd") == 2 * act + 2 * B * T * D * 4
    assert bytes_moved(B, hq, hk, T, D, mode="fwd+bwd") == 2 * bytes_moved(B, hq, hk, T, D)
    assert flops(B, hq, hk, T, D, mode="fwd+bwd") == 2 * flops(B, hq, hk, T, D) == 6 * act // 2
    with pytest.raises(ValueError, match="mode"):
        flops(B, hq, hk, T, D, mode="backward")


def test_launch_config_fills_the_tile():
    assert rp.launch_config(4096, 32, 8, 64) == (64, 32, 8, 1)            # Llama-3-8B: one token, all heads
    assert rp.launch_config(37, 6, 2, 40) == (64, 8, 2, 4)                 # few heads: several tokens
    assert rp.launch_config(3, 1, 1, 8) == (8, 1, 1, 4)                    # never more tokens than T (rounded up)
    assert rp.launch_config(37, 6, 2, 40, interpreter=True) == (64, 8, 2, 64)


# ----------------------------------------------------------------------------- compiled for a GPU
def test_kernel_compiles_for_sm90a_and_sm80_without_spills(tmp_path):
    """Forward and backward at Llama-3-8B's heads (32 + 8, D = 128) in bf16, the in-place launch
    (q alone), and the backward at 6 + 2 heads of D = 80 in fp16 (fp32 cos/sin, the models'
    strided views) for sm_90a, the bf16 backward for sm_80: no register spills."""
    compile_in_subprocess(__file__, tmp_path)


def launch_ints(B, hq, hk, T, D) -> dict:
    """The kernel's integer arguments as the launcher passes them for the models' (B, T, H, D)
    views and a shared (T, D) fp32 cos/sin (a meta-device stand-in: no memory)."""
    q = torch.empty(B, T, hq, D, device="meta").transpose(1, 2)
    k = torch.empty(B, T, hk, D, device="meta").transpose(1, 2)
    cos = torch.empty(1, T, D, device="meta")
    names = ["sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd", "sob", "soh", "sot", "sod",
             "spb", "sph", "spt", "spd", "scb", "sct", "scd", "ssb", "sst", "ssd"]
    strides = [*q.stride(), *k.stride(), *q.stride(), *k.stride(), 0, *cos.stride()[1:], 0, *cos.stride()[1:]]
    return dict(T=T, HQ=hq, HK=hk, HALF=D // 2, **dict(zip(names, strides)))


def _compile_all():
    from compile_check import compile_with_usage, require_nvidia_compiler

    GPUTarget, ASTSource = require_nvidia_compiler()
    kernel = rp._rope_kernel
    names = kernel.arg_names
    # the directions differ only in two signs: both on sm_90a at Llama-3-8B's heads, the backward
    # elsewhere; 0 heads of k: the in-place launch, one tensor at a time
    for cc, dtype, (hq, hk, D), directions in ((90, "bf16", (32, 8, 128), (False, True)), (90, "bf16", (32, 0, 128),
                                               (False,)), (90, "fp16", (6, 2, 80), (True,)),
                                               (80, "bf16", (32, 8, 128), (True,))):
        t = "*" + dtype
        block_half, hbq, hbk, block_t = rp.launch_config(4096, hq, hk, D // 2)
        ints = launch_ints(2, hq, hk, 4096, D)
        # as Triton specializes a launch: integers equal to 1 become constants, multiples of 16 are marked so
        consts = dict(BLOCK_T=block_t, BLOCK_HALF=block_half, HBQ=hbq, HBK=hbk, **{n: 1 for n, v in ints.items()
                                                                                    if v == 1})
        sig = {n: "constexpr" if n in consts or n in ("BACKWARD", "OFFS_64") else "i32" for n in names}
        sig.update(Q=t, K=t, QO=t, KO=t, COS="*fp32", SIN="*fp32")
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if sig[n].startswith("*") or (sig[n] == "i32" and ints[n] % 16 == 0)}
        for backward in directions:
            src = ASTSource(fn=kernel, signature=sig, constexprs=dict(consts, BACKWARD=backward, OFFS_64=False),
                            attrs=attrs)
            _, use = compile_with_usage(src, GPUTarget("cuda", cc, 32), dict(num_warps=rp.NUM_WARPS))
            assert use["spill_bytes"] == 0, (cc, dtype, backward, use)
