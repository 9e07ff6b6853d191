"""Document masking in fused attention (`segment_ids`): the triton kernels' output and dq, dk,
dv against a float64 reference on packed rows with uneven segments (and block sizes small
enough that whole tiles are skipped); the torch backend equal to running each segment on its
own; GQA, padding ids, separate key ids and rows with no key; argument checks; the segment
kernels compiled for a GPU ahead of time.

Error measure as tests/kernels/test_attention.py: max |x − ref| / max |ref|, NaN = infinite;
fp32 below 1e-5, fp16 within 3× PyTorch's own fp16 error plus a 2e-4 floor.
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from compile_check import compile_in_subprocess

from ltk.kernels.attention import attention, attention_reference
from ltk.kernels.backend import HAS_TRITON, interpreter_on

attn_mod = importlib.import_module("ltk.kernels.attention")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = HAS_TRITON and (CUDA or interpreter_on())
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton needs CUDA or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
FP32_TOL, LOW_FLOOR = 1e-5, 2e-4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return math.inf
    scale = ref.abs().max().item()
    return (x.double().cpu() - ref.cpu()).abs().max().item() / (scale if scale > 0 else 1.0)


def segments_of(*rows: list[int], dtype=torch.int64) -> torch.Tensor:
    """Each row given as segment lengths; a negative length -n is n padding slots (id -1)."""
    out = []
    for lengths in rows:
        ids = []
        for s, n in enumerate(lengths):
            ids += [s] * n if n > 0 else [-1] * -n
        out.append(ids)
    return torch.tensor(out, dtype=dtype)


def qkv(B, H, Hkv, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g, dtype=torch.float64) for h, n in ((H, T), (Hkv, S), (Hkv, S))]


def run(fn, tensors, dtype, upstream):
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(upstream.to(DEVICE, dtype))
    return [out] + [t.grad for t in leaves]


def check(tensors, dtype, backend, **kw):
    """out, dq, dk, dv of `attention` in dtype against the float64 reference."""
    kw = {n: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    low = [t.to(dtype).double() for t in tensors]  # the reference sees the same rounded inputs
    B, H, T, D = tensors[0].shape
    up = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = run(lambda *t: attention_reference(*t, **kw), low, torch.float64, up)
    got = run(lambda *t: attention(*t, backend=backend, **kw), low, dtype, up)
    if dtype == torch.float32:
        budget = [FP32_TOL] * 4
    else:
        torch_low = run(lambda *t: attention_reference(*t, **kw), low, dtype, up)
        budget = [3 * rel_err(t, r) + LOW_FLOOR for t, r in zip(torch_low, exact)]
    report = {n: (rel_err(g, r), b) for n, g, r, b in zip(("out", "dq", "dk", "dv"), got, exact, budget)}
    assert all(e <= b for e, b in report.values()), f"errors above budget (error, budget): {report}"
    return got


# (B, H, H_kv, T, D, segment lengths per row): uneven segments, one row ending in padding,
# a one-token segment, GQA
CASES = {
    "T77-D32-4segs": (2, 2, 2, 77, 32, [[20, 33, 24], [5, 40, 30, 2]]),
    "T77-D32-padding": (2, 2, 2, 77, 32, [[31, 1, 40, -5], [77]]),
    "T50-D64-gqa4/2": (1, 4, 2, 50, 64, [[17, 13, 20]]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_float64_reference(case, backend):
    B, H, Hkv, T, D, rows = CASES[case]
    check(qkv(B, H, Hkv, T, T, D, seed=T), torch.float32, backend, causal=True, segment_ids=segments_of(*rows))


@needs_triton
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32)])
def test_triton_skips_tiles_between_segments_exactly(monkeypatch, blocks):
    """With 16-wide blocks most tiles of a row packed with segments of ~20 tokens hold no
    query-key pair of one segment and are skipped; the result must not change (and the int32
    ids take the same path as int64)."""
    if CUDA:
        pytest.skip("the interpreter's fixed blocks; a GPU autotunes")
    bm, bn = blocks
    monkeypatch.setattr(attn_mod, "INTERPRETER_BLOCKS", {"fwd": (bm, bn), "dkdv": (bn, bm), "dq": (bm, bn)})
    seg = segments_of([20, 33, 24], [5, 40, 30, 2], dtype=torch.int32)
    check(qkv(2, 2, 1, 77, 77, 32, seed=5), torch.float32, "triton", causal=True, segment_ids=seg)


@needs_triton
def test_fp16_within_three_times_pytorch_error():
    check(qkv(2, 2, 2, 77, 77, 32, seed=2), torch.float16, "triton", causal=True,
          segment_ids=segments_of([20, 33, 24], [5, 40, 30, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_row_equals_each_segment_alone(backend):
    """The point of document masking: each segment's output and gradients in the packed row
    are those of attention over that segment alone."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    lengths = [20, 33, 24]
    seg = segments_of(lengths)
    q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in qkv(1, 2, 2, 77, 77, 32, seed=7))
    attention(q, k, v, causal=True, segment_ids=seg.to(DEVICE), backend=backend).pow(2).sum().backward()
    start = 0
    for n in lengths:
        part = [t.detach()[:, :, start:start + n].clone().requires_grad_() for t in (q, k, v)]
        out_alone = attention(*part, causal=True, backend=backend)
        out_alone.pow(2).sum().backward()
        packed = attention(q.detach(), k.detach(), v.detach(), causal=True, segment_ids=seg.to(DEVICE),
                           backend=backend)[:, :, start:start + n]
        tol = 1e-12 if dtype == torch.float64 else FP32_TOL
        assert rel_err(packed, out_alone.detach().double()) < tol
        for full, alone in zip((q, k, v), part):
            assert rel_err(full.grad[:, :, start:start + n], alone.grad.double()) < tol
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_key_ids_and_rows_with_no_key(backend):
    """segment_ids_k for keys that are not the queries (T != S, not causal): a query whose
    segment has no key gives 0 and zero gradients, never NaN."""
    seg_q = torch.tensor([[0] * 10 + [1] * 13 + [9] * 10])  # id 9: no key has it
    seg_k = torch.tensor([[1] * 20 + [0] * 25])
    got = check(qkv(1, 2, 2, 33, 45, 32, seed=3), torch.float32, backend, segment_ids=seg_q, segment_ids_k=seg_k)
    assert (got[0][:, :, 23:] == 0).all() and (got[1][:, :, 23:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_segment_ids_are_named(backend):
    q = torch.randn(2, 2, 9, 16, device=DEVICE)
    kv = torch.randn(2, 2, 11, 16, device=DEVICE)
    seg = torch.zeros(2, 9, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="segment_ids must be an int32 or int64"):
        attention(q, q, q, causal=True, segment_ids=seg.float(), backend=backend)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, T\) = \(2, 9\)"):
        attention(q, q, q, causal=True, segment_ids=seg[:, :8], backend=backend)
    with pytest.raises(ValueError, match="pass segment_ids_k"):
        attention(q, kv, kv, segment_ids=seg, backend=backend)
    with pytest.raises(ValueError, match=r"segment_ids_k must have shape \(B, S\) = \(2, 11\)"):
        attention(q, kv, kv, segment_ids=seg, segment_ids_k=seg, backend=backend)
    with pytest.raises(ValueError, match="without segment_ids"):
        attention(q, q, q, segment_ids_k=seg, backend=backend)


@pytest.mark.exhaustive
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("cc", ["90", "80"])
def test_segment_kernels_compile_for_a_gpu_without_spills(tmp_path, monkeypatch, cc):
    """Segment ids change the loop bounds and add an id comparison per tile, which only the
    compiler sees in full: compile forward, dK/dV and dQ with segment ids, key padding and
    ragged lengths for Hopper and Ampere (bf16, int32 ids; each its own list) in a fresh process
    without the interpreter, every candidate of the masked table at every head dim, and check
    that none spills a register."""
    monkeypatch.setenv("LTK_SEGMENTS_EVERY_CANDIDATE", "1")
    monkeypatch.setenv("LTK_ATTENTION_CC", cc)
    compile_in_subprocess(__file__, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_segment_kernels_compile_for_a_gpu(tmp_path):
    """Forward, dK/dV and dQ with segment ids, key padding and ragged lengths compile for
    Hopper (bf16, int32 ids) in a fresh process without the interpreter, at each kernel's
    first candidate of the masked table."""
    compile_in_subprocess(__file__, tmp_path)


def _compile_all():
    from compile_check import require_nvidia_compiler

    require_nvidia_compiler()
    from test_attention import attn_mod, compile_candidates, compile_kernel

    flags = dict(CAUSAL=True, HAS_BIAS=False, HAS_KPM=True, HAS_SEG=True, EVEN_M=False, EVEN_N=False, STORE_DS=False)
    if os.environ.get("LTK_SEGMENTS_EVERY_CANDIDATE"):
        spills = compile_candidates("masked", flags, every_dim=True)
        assert not spills, "\n".join(spills)
        return
    A = attn_mod  # the default run: each kernel's first masked candidate compiles (spills: the sweep above)
    for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
        c = A._gpu_configs(name, 128, kind="masked")[0]
        compile_kernel(fn, dict(HEAD_DIM=128, BLOCK_D=128, FP32_DOTS=False, DOT_PRECISION=None, **flags, **c.kwargs),
                       c.num_warps, c.num_stages, "bf16")
