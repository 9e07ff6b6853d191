"""Fused attention: the output and every gradient (dq, dk, dv, dbias) of each backend against
a float64 `attention_reference` on odd shapes, masks, GQA and biases; argument checks; the
cost model; the kernels compiled for GPUs ahead of time. On a CPU the triton backend runs in
Triton's interpreter (fp32, fp16, and bf16 through fp32 tiles); tests marked `gpu` run the
compiled kernels and skip themselves elsewhere.

Error measure (one number per tensor): max |x − ref| / max |ref| — the largest error in
units of the tensor's scale, so one wrong element cannot hide in an average. NaN anywhere
counts as an infinite error; the kernels' outputs are filled with NaN before launch under
the interpreter, so an element a kernel forgot to write fails.

Budget (DESIGN.md): fp32 below 1e-5; fp16/bf16 at most 3× the error of PyTorch's own
attention (`attention_reference` run in that dtype: matmul, softmax, matmul) against float64,
plus a floor of 2e-4 (a fraction of one fp16 ulp at the tensor's scale).
"""
from __future__ import annotations

import importlib
import math
import os
import re
import subprocess

import pytest
import torch
from compile_check import compile_in_subprocess
from hypothesis import given, settings
from hypothesis import strategies as st

import ltk.kernels.backend as kernel_backend
from ltk.kernels.attention import attention, attention_reference, bytes_moved, flops
from ltk.kernels.backend import HAS_TRITON, interpreter_on

# `kernels.attention` is the public function (ltk/kernels/__init__.py), so reach the module itself
# through the import system rather than as an attribute of the package.
attn_mod = importlib.import_module("ltk.kernels.attention")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = HAS_TRITON and (CUDA or interpreter_on())
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="triton needs CUDA or TRITON_INTERPRET=1 set before kernels are imported"))]
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: compiled kernels and bf16 numerics")
FP32_TOL = 1e-5
LOW_FLOOR = 2e-4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| / max |ref| (an absolute error where ref is all zeros); inf on NaN/inf."""
    if not torch.isfinite(x).all():
        return math.inf
    scale = ref.abs().max().item()
    return (x.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def make_case(B, H, Hkv, T, S, D, *, pad=False, bias=None, dead_bias_row=False, seed=0):
    """fp64 leaves q, k, v (and bias) and a key padding mask whose last sequence is all
    masked (nothing to attend: outputs and gradients must be 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    mask = None
    if pad:
        mask = torch.rand(B, S, generator=g) > 0.3
        mask[-1] = False
    b = None
    if bias is not None:
        b = torch.randn(*bias, generator=g, dtype=torch.float64)
        if dead_bias_row and b.shape[-2] > 2:
            b[..., 0, 2, :] = float("-inf")  # a query row the bias alone masks entirely
    return [q, k, v] + ([b] if b is not None else []), mask


def run(fn, tensors, dtype, upstream=None):
    """Output and input gradients of fn(*leaves) for leaves = tensors cast to dtype."""
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(upstream.to(DEVICE, dtype))
    return [out] + [t.grad for t in leaves], upstream


def check_against_reference(tensors, mask, dtype, backend, **kw):
    """Compare every output/gradient with float64; returns {name: (error, budget)}."""
    low = [t.to(dtype) for t in tensors]  # the reference sees the same rounded inputs
    mask = None if mask is None else mask.to(DEVICE)

    def ref(*t):
        return attention_reference(*t[:3], key_padding_mask=mask, bias=t[3] if len(t) > 3 else None, **kw)

    def ours(*t):
        return attention(*t[:3], key_padding_mask=mask, bias=t[3] if len(t) > 3 else None, backend=backend, **kw)

    exact, up = run(ref, low, torch.float64)
    got, _ = run(ours, low, dtype, up)
    if dtype == torch.float32:
        budget = [FP32_TOL] * len(got)
    else:
        torch_low, _ = run(ref, low, dtype, up)
        budget = [3 * rel_err(t, r) + LOW_FLOOR for t, r in zip(torch_low, exact)]
    names = ["out", "dq", "dk", "dv", "dbias"]
    report = {n: (rel_err(g.cpu(), r.cpu()), b) for n, g, r, b in zip(names, got, exact, budget)}
    bad = {n: eb for n, eb in report.items() if not eb[0] <= eb[1]}
    assert not bad, f"errors above budget (error, budget): {bad}"
    if mask is not None:  # the fully masked sequence: exact zeros, not merely small numbers
        assert (got[0][-1] == 0).all() and (got[1][-1] == 0).all()
        assert (got[2][-1] == 0).all() and (got[3][-1] == 0).all()
    return report


# (B, H, H_kv, T, S, D, causal, pad, bias shape): odd lengths, T != S, GQA 4/2 and 4/1,
# head dims 32/64/96/128, causal T < S (decoding) and T > S (rows with no key), exact
# multiples of the blocks (the unmasked fast path).
CASES = {
    "T1-S77-gqa4/1-causal-D32": (2, 4, 1, 1, 77, 32, True, False, None),
    "T7-causal-D32": (1, 2, 2, 7, 7, 32, True, False, None),
    "T77-gqa4/2-causal-D64": (1, 4, 2, 77, 77, 64, True, False, None),
    "T64-S64-even-causal-D64": (1, 2, 2, 64, 64, 64, True, False, None),
    "T130-S67-pad-D96": (2, 2, 2, 130, 67, 96, False, True, None),
    "T77-S50-causal-D128": (1, 2, 2, 77, 50, 128, True, False, None),
    "T20-S37-bias(1,H,T,S)-causal-pad": (2, 2, 2, 20, 37, 64, True, True, (1, 2, 20, 37)),
    "T33-S45-bias(B,1,1,S)-pad-gqa4/2": (2, 4, 2, 33, 45, 32, False, True, (2, 1, 1, 45)),
}
FP16_CASES = ["T77-gqa4/2-causal-D64", "T33-S45-bias(B,1,1,S)-pad-gqa4/2", "T130-S67-pad-D96"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_float64_reference(case, backend):
    B, H, Hkv, T, S, D, causal, pad, bias = CASES[case]
    tensors, mask = make_case(B, H, Hkv, T, S, D, pad=pad, bias=bias, dead_bias_row=bias is not None)
    check_against_reference(tensors, mask, torch.float32, backend, causal=causal)


LOW_CASES = [(c, torch.float16) for c in FP16_CASES] + [("T77-gqa4/2-causal-D64", torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", LOW_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in LOW_CASES])
def test_low_precision_within_three_times_pytorch_error(case, dtype, backend):
    """fp16; and one bf16 case: the interpreter's bf16 arithmetic is wrong, but the kernels
    convert bf16 tiles to fp32 before any arithmetic there, so bf16 inputs work too."""
    B, H, Hkv, T, S, D, causal, pad, bias = CASES[case]
    tensors, mask = make_case(B, H, Hkv, T, S, D, pad=pad, bias=bias, seed=1)
    check_against_reference(tensors, mask, dtype, backend, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_no_grad(backend):
    tensors, _ = make_case(1, 2, 2, 19, 23, 32)
    check_against_reference(tensors, None, torch.float32, backend, softmax_scale=0.3, causal=True)
    q, k, v = (t.float().to(DEVICE) for t in tensors)
    with torch.no_grad():
        out = attention(q, k, v, backend=backend)
    assert rel_err(out.cpu(), attention_reference(*tensors).cpu()) < FP32_TOL


@pytest.mark.skipif(not TRITON_RUNS, reason="needs the triton backend")
@pytest.mark.parametrize("blocks", [(16, 32), (16, 16), (32, 16)])
@pytest.mark.parametrize("T,S", [(45, 70), (70, 45)])
def test_triton_loop_bounds_for_other_block_sizes(monkeypatch, blocks, T, S):
    """The causal loop bounds (skipped, diagonal and full blocks) depend on BLOCK_M vs
    BLOCK_N; the GPU tunes over both orders, so check both here."""
    if CUDA:
        pytest.skip("the interpreter's fixed blocks; a GPU autotunes")
    bm, bn = blocks
    monkeypatch.setattr(attn_mod, "INTERPRETER_BLOCKS", {"fwd": (bm, bn), "dkdv": (bn, bm), "dq": (bm, bn)})
    tensors, _ = make_case(1, 2, 1, T, S, 32, seed=T)
    check_against_reference(tensors, None, torch.float32, "triton", causal=True)


@pytest.mark.skipif(not TRITON_RUNS or CUDA, reason="drives the GPU launch path through the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_launch_path_autotunes_and_matches(monkeypatch, dtype):
    """The launch code a GPU takes (autotuner, config pruning, grid lambdas, EVEN_* flags from
    the chosen blocks, dots in the input dtype), run by the interpreter with a stub timer."""
    monkeypatch.setattr(attn_mod, "interpreter_on", lambda: False)
    kernels = (attn_mod._attn_fwd_tuned, attn_mod._attn_bwd_dkdv_tuned, attn_mod._attn_bwd_dq_tuned)
    for tuned in kernels:
        monkeypatch.setattr(tuned, "_do_bench", lambda call, quantiles=None: (call(), [1.0, 1.0, 1.0])[1])
        monkeypatch.setattr(tuned, "cache", {})
    tensors, mask = make_case(2, 2, 1, 128, 130, 64, pad=True, bias=(1, 2, 128, 130))
    report = check_against_reference(tensors, mask, dtype, "triton", causal=True)
    assert set(report) == {"out", "dq", "dk", "dv", "dbias"}
    assert all(len(tuned.cache) == 1 for tuned in kernels)  # each kernel went through its autotuner


@pytest.mark.skipif(not TRITON_RUNS, reason="needs the triton backend")
def test_triton_takes_strided_inputs():
    """(B, T, H, D) tensors viewed as (B, H, T, D) run without a copy; a head dim that is
    not unit-stride is copied; the result is the same either way."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 4, 32, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, T, D), strided
    k = torch.randn(2, 2, 32, 30, generator=g).to(DEVICE).transpose(2, 3)  # (B, H_kv, S, D), D not unit
    v = torch.randn(2, 30, 2, 32, generator=g).to(DEVICE).transpose(1, 2)
    out = attention(q, k, v, causal=True, backend="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(out.cpu(), ref.cpu()) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_no_key_give_zeros_not_nan(backend):
    """Causal with T > S: the first T − S queries see no key at all."""
    q = torch.randn(1, 2, 9, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True)
    out = attention(q, k, v, causal=True, backend=backend)
    out.sum().backward()
    assert (out[:, :, :5] == 0).all() and torch.isfinite(out).all()
    assert (q.grad[:, :, :5] == 0).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_reference_matches_sdpa_convention():
    """Bottom-right causal equals SDPA's is_causal when T == S, and the causal mask of the
    last T rows of a T == S problem when T < S (decoding with a cache)."""
    q, k, v = (torch.randn(2, 3, 12, 16, dtype=torch.float64) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(attention_reference(q, k, v, causal=True), sdpa)
    tail = attention_reference(q[:, :, -5:], k, v, causal=True)
    assert torch.allclose(tail, sdpa[:, :, -5:])


# ---------------------------------------------------------------------------- bad input
def _inputs(**over):
    t = dict(q=torch.randn(2, 4, 5, 32), k=torch.randn(2, 2, 6, 32), v=torch.randn(2, 2, 6, 32))
    t.update(over)
    return t


BAD = [
    (dict(q=torch.randn(4, 5, 32)), ValueError, "q must have 4 dims"),
    (dict(k=torch.randn(3, 2, 6, 32), v=torch.randn(3, 2, 6, 32)), ValueError, "batch"),
    (dict(k=torch.randn(2, 2, 6, 16), v=torch.randn(2, 2, 6, 16)), ValueError, "head dim"),
    (dict(v=torch.randn(2, 2, 7, 32)), ValueError, "k and v"),
    (dict(k=torch.randn(2, 3, 6, 32), v=torch.randn(2, 3, 6, 32)), ValueError, "H_kv"),
    (dict(q=torch.randn(2, 4, 5, 300), k=torch.randn(2, 2, 6, 300), v=torch.randn(2, 2, 6, 300)),
     ValueError, "head dim"),
    (dict(q=torch.randn(2, 4, 0, 32)), ValueError, "q has a zero-size"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 32))), TypeError, "q has dtype"),
    (dict(k=torch.randn(2, 2, 6, 32, dtype=torch.float16)), TypeError, "k has dtype"),
    (dict(q="q"), TypeError, "q must be a torch.Tensor"),
    (dict(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(bias=torch.randn(2, 3, 5, 6)), ValueError, "bias"),
    (dict(bias=torch.randn(1, 2, 4, 5, 6)), ValueError, "bias"),
    (dict(bias=torch.randint(0, 2, (5, 6))), TypeError, "bias"),
    (dict(softmax_scale="large"), ValueError, "softmax_scale"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(k=torch.randn(2, 2, 6, 32, device="meta"), v=torch.randn(2, 2, 6, 32, device="meta")),
     ValueError, "different devices"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_names_the_argument(backend, over, exc, match):
    args = _inputs(**over)
    args.setdefault("backend", backend)
    if isinstance(args["q"], torch.Tensor) and args["q"].device.type == "cpu" and CUDA:
        args = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
                for n, t in args.items()}
    with pytest.raises(exc, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs the triton backend")
def test_triton_refuses_float64():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        attention(q, q, q, backend="triton")
    assert attention(q, q, q, backend="torch").dtype == torch.float64  # the torch backend runs it


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernel_backend, "interpreter_on", lambda: False)
    q = torch.randn(1, 2, 4, 16)
    if not HAS_TRITON:
        match = "needs the triton package"
    else:
        match = "interpreter"
    with pytest.raises(ValueError, match=match):
        attention(q, q, q, causal=True, backend="triton")
    assert torch.equal(attention(q, q, q, backend="auto"), attention(q, q, q, backend="torch"))


@pytest.mark.skipif(not TRITON_RUNS or CUDA, reason="checks the interpreter's poisoning")
def test_outputs_are_poisoned_under_the_interpreter():
    """An output element no program writes stays NaN and fails `rel_err`."""
    assert attn_mod._poison()
    assert torch.isnan(attn_mod._new((2, 3), torch.zeros(1))).all()


# -------------------------------------------------------------- properties (hypothesis)
@pytest.mark.skipif(not TRITON_RUNS, reason="needs the triton backend")
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), S=st.integers(1, 40), D=st.sampled_from([8, 16, 24, 40]),
       causal=st.booleans(), group=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_triton_forward_any_shape(T, S, D, causal, group, seed):
    tensors, _ = make_case(1, 2 * group, 2, T, S, D, seed=seed)
    q, k, v = (t.float().to(DEVICE) for t in tensors)
    out = attention(q, k, v, causal=causal, backend="triton")
    assert rel_err(out.cpu(), attention_reference(*tensors, causal=causal)) < FP32_TOL


# ------------------------------------------------------------------------ cost model
def test_flops_convention():
    f = flops(2, 3, 128, 128, 64)
    assert f == 4 * 2 * 3 * 128 * 128 * 64
    assert flops(2, 3, 128, 128, 64, causal=True) == f / 2
    assert flops(2, 3, 128, 128, 64, mode="bwd") == 2.5 * f
    assert flops(2, 3, 128, 128, 64, mode="fwd+bwd") == 3.5 * f
    for T, S in [(5, 9), (9, 5), (1, 7)]:  # T != S: exactly the visible pairs
        visible = attn_mod._allowed_keys(T, S, True, None, "cpu").sum().item()
        assert flops(1, 1, T, S, 8, causal=True) == pytest.approx(4 * visible * 8)
    with pytest.raises(ValueError, match="mode"):
        flops(1, 1, 8, 8, 8, mode="backward")


def test_bytes_moved_counts_each_tensor_once():
    B, H, Hkv, T, S, D = 2, 8, 2, 100, 300, 64
    q, kv, row = B * H * T * D * 2, B * Hkv * S * D * 2, B * H * T * 4
    assert bytes_moved(B, H, Hkv, T, S, D) == 2 * q + 2 * kv + row
    assert bytes_moved(B, H, Hkv, T, S, D, mode="bwd") == 4 * q + 4 * kv + 3 * row
    assert bytes_moved(B, H, Hkv, T, S, D, dtype_bytes=4, mode="fwd+bwd") == 2 * (6 * q + 6 * kv) + 4 * row
    naive = B * H * T * S * 2 * 2  # just writing and reading S once: already more
    assert naive > bytes_moved(B, H, Hkv, T, S, D)
    with pytest.raises(ValueError, match="mode"):
        bytes_moved(1, 1, 1, 8, 8, 8, mode="both")


# ------------------------------------------------------------------- compiled kernels
def compile_kernel(fn, consts, num_warps, num_stages, dtype, cc=90):
    """Compile one kernel for CUDA compute capability `cc` (90: sm_90a) without a GPU, as a
    launch with contiguous inputs specializes it: pointers and row strides divisible by 16,
    the bias's unit key stride a constant (Triton makes an integer argument equal to 1 one)."""
    import triton
    from triton.backends.compiler import GPUTarget

    ptr = dict(LSE="fp32", DELTA="fp32", DS="fp32", BIAS="fp32", KPM="u8", SEGQ="i32", SEGK="i32", SEGR="i32")
    consts = {n: v for n, v in {"stride_bs": 1, **consts}.items() if n in fn.arg_names}
    ints = ("H", "T", "S", "GROUP", "T_BUCKET", "S_BUCKET")
    sig = {n: "constexpr" if n in consts else "i32" if n in ints or n.startswith("stride_") else
           "fp32" if n in ("qk_scale", "sm_scale") else "*" + ptr.get(n, dtype) for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if sig[n][0] == "*" or n.startswith("stride_") and sig[n] == "i32"}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))


def stack_bytes(kernel) -> int:
    """The compiled kernel's stack frame (cuobjdump -res-usage), where spilled registers go;
    what CUDA reports as its local memory size (Triton's n_spills) once loaded on a GPU."""
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


def compile_candidates(kind, flags, dtype="bf16", every_dim=None, cc=None):
    """Compile the GPU candidates of `kind` (attention_triton's plain / masked / bias table) for
    compute capability `cc` (90: sm_90a, 80: sm_80; default: the environment's LTK_ATTENTION_CC,
    else 90), every kernel with `flags`; return the ones that spill. Every candidate at head dim
    128 and the first at 64 and 256; all of them at every head dim with every_dim (default: the
    environment's LTK_ATTENTION_DIMS=all, which the exhaustive tests set)."""
    A = attn_mod
    if every_dim is None:
        every_dim = os.environ.get("LTK_ATTENTION_DIMS") == "all"
    cc = cc or int(os.environ.get("LTK_ATTENTION_CC", "90"))
    spills = []
    for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
        for d in (64, 128, 256):
            configs = A._gpu_configs(name, d, kind=kind, arch=cc)
            for c in configs if every_dim or d == 128 else configs[:1]:
                consts = dict(HEAD_DIM=d, BLOCK_D=d, FP32_DOTS=False, DOT_PRECISION=None, **flags, **c.kwargs)
                k = compile_kernel(fn, consts, c.num_warps, c.num_stages, dtype, cc=cc)
                if stack_bytes(k):
                    spills.append(f"{name} {kind} D={d} sm_{cc} {c}: {stack_bytes(k)} bytes of stack")
    return spills


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_a_launch_draws_the_table_its_flags_allow():
    """The bias keeps its larger tiles only where nothing else masks a tile: key padding,
    segment ids or a ragged length (not a multiple of 128) send it to the bias-masked table,
    whose candidates are the ones compiled spill-free with those masks."""
    from ltk.kernels.attention_triton import variant

    assert variant(True, False, False, 256, 4096) == "bias"
    assert [variant(True, *a) for a in ((True, False, 256, 256), (False, True, 256, 256), (False, False, 200, 256),
                                        (False, False, 256, 130))] == ["bias-masked"] * 4
    assert variant(False, False, False, 128, 256) == "plain"
    assert variant(False, True, False, 128, 256) == variant(False, False, False, 128, 100) == "masked"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_every_candidate_compiles_for_gpus_without_spills(tmp_path, monkeypatch):
    """Compile each kernel without a GPU, in a fresh process without the interpreter: what
    only the compiler sees (dot shapes and dtypes, constexpr branches, types of the pointer
    arithmetic) fails here, not first on a GPU; and every autotune candidate of the plain
    table at head dim 128 (and the first at 64 and 256) compiles for sm_90a with no spilled
    register."""
    monkeypatch.setenv("LTK_ATTENTION_TABLE", "plain")
    compile_in_subprocess(__file__, tmp_path)


@pytest.mark.exhaustive
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_every_candidate_at_every_head_dim_compiles_without_spills(tmp_path, monkeypatch):
    monkeypatch.setenv("LTK_ATTENTION_TABLE", "plain")
    monkeypatch.setenv("LTK_ATTENTION_DIMS", "all")
    compile_in_subprocess(__file__, tmp_path)


# The two bias tables at every head dim, each in the worst flags of its own variant (the stored
# dS, fp16): "bias" with even lengths and no key padding, "bias-masked" with key padding and
# ragged lengths (`BIAS_FLAGS`).
@pytest.mark.exhaustive
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("table", ["bias", "bias-masked"])
def test_every_bias_candidate_compiles_without_spills(tmp_path, monkeypatch, table):
    monkeypatch.setenv("LTK_ATTENTION_TABLE", table)
    monkeypatch.setenv("LTK_ATTENTION_DIMS", "all")
    compile_in_subprocess(__file__, tmp_path)


# Ampere's lists (attention_triton.gpu_blocks(80, ...)): the plain and both bias tables at every head dim, sm_80
@pytest.mark.exhaustive
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("table", ["plain", "bias", "bias-masked"])
def test_every_candidate_compiles_for_sm80_without_spills(tmp_path, monkeypatch, table):
    monkeypatch.setenv("LTK_ATTENTION_TABLE", table)
    monkeypatch.setenv("LTK_ATTENTION_DIMS", "all")
    monkeypatch.setenv("LTK_ATTENTION_CC", "80")
    compile_in_subprocess(__file__, tmp_path)


# the worst flags a launch drawing from each bias table can have (attention_triton.variant)
BIAS_FLAGS = {"bias": dict(HAS_KPM=False, EVEN_M=True, EVEN_N=True),
              "bias-masked": dict(HAS_KPM=True, EVEN_M=False, EVEN_N=False)}


def _compile_all():
    from compile_check import require_nvidia_compiler

    require_nvidia_compiler()
    causal = dict(CAUSAL=True, HAS_KPM=False, HAS_SEG=False)
    table = os.environ.get("LTK_ATTENTION_TABLE")
    if table in BIAS_FLAGS:
        spills = compile_candidates(table, dict(causal, HAS_BIAS=True, STORE_DS=True, **BIAS_FLAGS[table]),
                                    dtype="fp16")
        assert not spills, "\n".join(spills)
        return
    spills = compile_candidates("plain", dict(causal, HAS_BIAS=False, EVEN_M=True, EVEN_N=True, STORE_DS=False))
    assert not spills, "\n".join(spills)
    if os.environ.get("LTK_ATTENTION_CC", "90") != "90":  # an Ampere sweep: the list only
        return
    A = attn_mod
    # Ampere, a padded head dim (96 in a 128 block), ragged lengths; fp32's IEEE dots; the preprocess
    ragged = dict(HEAD_DIM=96, BLOCK_D=128, CAUSAL=False, HAS_BIAS=True, HAS_KPM=True, HAS_SEG=False,
                  EVEN_M=False, EVEN_N=False, STORE_DS=True)
    for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
        c = A._gpu_configs(name, 128, kind="bias-masked")[0]
        compile_kernel(fn, dict(ragged, FP32_DOTS=False, DOT_PRECISION=None, **c.kwargs), c.num_warps,
                       c.num_stages, "fp16", cc=80)
        c = A._gpu_configs(name, 64, fp32=True)[0]
        compile_kernel(fn, dict(ragged, HEAD_DIM=64, BLOCK_D=64, CAUSAL=True, FP32_DOTS=False, DOT_PRECISION="ieee",
                                **c.kwargs), c.num_warps, c.num_stages, "fp32")
    compile_kernel(A._attn_bwd_preprocess, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64), 4, 1, "bf16")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 8, 8, 1024, 1024, 128, True), (1, 8, 2, 777, 901, 96, False),
                                   (2, 4, 1, 333, 129, 64, True)])
def test_compiled_kernels_low_precision(dtype, shape):
    B, H, Hkv, T, S, D, causal = shape
    tensors, mask = make_case(B, H, Hkv, T, S, D, pad=not causal, bias=None if causal else (1, H, T, S))
    check_against_reference(tensors, mask, dtype, "triton", causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bias_that_empties_a_row_gives_zeros(backend):
    """A row can be emptied by the bias alone (-inf everywhere), with no mask at all."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 2, 5, 7)
    bias[0, 1, 3] = float("-inf")
    k7, v7 = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    out = attention(q, k7, v7, bias=bias, backend=backend)
    assert torch.isfinite(out).all() and (out[0, 1, 3] == 0).all()
    ref = attention_reference(q.double(), k7.double(), v7.double(), bias=bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert (q.grad[0, 1, 3] == 0).all() and torch.isfinite(q.grad).all()
