"""NF4 (ltk/kernels/nf4.py, ltk/kernels/nf4_triton.py): the code tables, quantization, double
quantization and dequantization byte for byte against bitsandbytes (CPU, 0.50); the fused
dequantize-matmul and its dx under the Triton interpreter against a float64 reference of
dequantize-then-matmul; NF4Linear; bits a parameter; the cost model; bad input.

Error measure for the matmul: err = max|out − ref| / max|ref|, ref in float64 from the same
dequantized weight and the same (rounded) x. Budget: fp32 1e-5; fp16/bf16 3 × the err of
torch's own F.linear in that dtype on the same inputs + half an ulp of the dtype.
"""
from __future__ import annotations

import math
import os
import re
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from compile_check import compile_in_subprocess, poison_outputs

import ltk.kernels.nf4 as nf4_mod
import ltk.kernels.nf4_triton as nt
from ltk.kernels.backend import HAS_TRITON, interpreter_on
from ltk.kernels.nf4 import (
    NF4_CODE,
    NF4Linear,
    bytes_moved,
    crossover_m,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_code,
    flops,
    fused_path,
    nf4_bits_per_param,
    nf4_code_from_quantiles,
    nf4_matmul,
    nf4_matmul_dq,
    quantize_absmax,
    quantize_nf4,
)

try:
    import bitsandbytes.functional as bnbF
except ImportError:  # pragma: no cover - depends on the environment
    bnbF = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes is not installed (pip install bitsandbytes)")
triton_ok = pytest.mark.skipif(DEVICE == "cpu" and not interpreter_on(),
                               reason="triton backend needs CUDA or TRITON_INTERPRET=1")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# odd sizes: numel not a multiple of 64 or of 2, a byte and a block straddling rows, one element
SHAPES = [(128, 64), (96, 320), (7, 9), (5, 13), (130, 192), (3, 100), (1, 1), (33,), (300, 301)]


def poisoned():
    return poison_outputs(nt)


def weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.05).to(dtype).to(DEVICE)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality is bitwise (−0 ≠ 0, NaN = NaN)."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


# ---------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------
@needs_bnb
def test_codes_equal_bitsandbytes_tables():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map())


def test_nf4_code_is_normal_quantiles():
    derived = nf4_code_from_quantiles()
    assert (derived.float() - NF4_CODE).abs().max().item() <= 1e-7
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7  # asymmetric, exact zero
    # equal mass: each code's bin holds ~1/16 of N(0, σ²) with σ = 1/Q(δ)... checked on samples
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) / 1.848
    q = torch.bucketize(x.clamp(-1, 1), (NF4_CODE[:-1] + NF4_CODE[1:]) / 2)
    freq = torch.bincount(q, minlength=16).double() / x.numel()
    assert freq.min() > 0.03 and freq.max() < 0.12  # near-uniform use of the 16 codes


# ---------------------------------------------------------------------------------------
# Quantize / dequantize against bitsandbytes
# ---------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_match_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, absmax = quantize_nf4(w, blocksize=64)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(bits(absmax), bits(state.absmax))
    ours = dequantize_nf4(packed, absmax, shape, 64, dtype)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(bits(ours), bits(bnbF.dequantize_4bit(ref_packed, state)))


@needs_bnb
@pytest.mark.parametrize("shape", [(96, 320), (7, 9), (300, 301), (1, 1), (64 * 256 * 2 + 5,)])
def test_double_quantization_matches_bitsandbytes(shape):
    w = weight(shape)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, absmax = quantize_nf4(w, blocksize=64)
    codes, scales, offset = quantize_absmax(absmax, blocksize=256)
    assert codes.dtype == torch.uint8 and scales.shape == (math.ceil(absmax.numel() / 256),)
    assert torch.equal(codes, state.absmax.reshape(-1))
    assert torch.equal(bits(scales), bits(state.state2.absmax))
    assert torch.equal(bits(offset.reshape(1)), bits(state.offset.reshape(1)))
    restored = dequantize_absmax(codes, scales, offset, blocksize=256)
    ref_restored = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(bits(restored), bits(ref_restored))
    # the whole double-quantized round trip gives bitsandbytes' weight bit for bit
    packed, _ = quantize_nf4(w, blocksize=64)
    assert torch.equal(bits(dequantize_nf4(packed, restored, shape)), bits(bnbF.dequantize_4bit(ref_packed, state)))
    # and costs little: the restored scales are within the 8-bit code's resolution
    assert ((restored - absmax).abs() / absmax).max().item() < 0.05


def test_ties_go_to_the_lower_code_and_zero_blocks():
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, torch.zeros(1)])  # absmax 1: the midpoints themselves
    packed, absmax = quantize_nf4(w, blocksize=64)
    q = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: w.numel()]
    assert q[0] == 15 and torch.equal(q[1:16], torch.arange(15, dtype=torch.uint8)) and q[16] == 7
    packed, absmax = quantize_nf4(torch.zeros(130), blocksize=64)  # zero blocks: code of 0, absmax 0
    assert torch.all(packed == 0x77) and absmax[:2].eq(0).all() and absmax[2] == 1e-38


def test_nf4_error_is_small_for_normal_weights():
    w = weight((256, 256))
    p, a = quantize_nf4(w)
    rel = (dequantize_nf4(p, a, w.shape) - w).norm() / w.norm()
    assert rel < 0.12  # ~0.1 for N(0, σ²) at blocksize 64


def test_bits_per_param():
    assert nf4_bits_per_param() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(nf4_bits_per_param(), 3) == 4.127
    assert nf4_bits_per_param(double=False) == 4.5
    # measured from the tensors actually stored
    w = weight((512, 1024))
    p, a = quantize_nf4(w)
    c, s, o = quantize_absmax(a)
    stored_bits = 8 * (p.numel() + c.numel() + 4 * s.numel() + 4 * o.numel())
    assert stored_bits / w.numel() == pytest.approx(nf4_bits_per_param(), abs=1e-4)


# ---------------------------------------------------------------------------------------
# Triton: dequantize kernel and the fused matmul
# ---------------------------------------------------------------------------------------
@triton_ok
@pytest.mark.parametrize("shape", [(7, 9), (130, 192), (33,), (300, 301)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequantize(shape, dtype):
    p, a = quantize_nf4(weight(shape))
    ref = dequantize_nf4(p, a, shape, 64, dtype)
    with poisoned():
        got = dequantize_nf4(p, a, shape, 64, dtype, backend="triton")
    if dtype == torch.bfloat16 and interpreter_on():
        # the interpreter's fp32 -> bf16 store does not round to nearest: allow one bf16 ulp
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7).all()
    else:
        assert torch.equal(bits(got), bits(ref))


def rel_err(out, ref):
    return (out.double() - ref).abs().max().item() / ref.abs().max().item()


@triton_ok
@pytest.mark.parametrize("x_shape,n", [((3, 5, 64), 96), ((2, 3, 128), 130), ((7, 37), 33), ((1, 200), 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matmul_and_dx(x_shape, n, dtype):
    k = x_shape[-1]
    g = torch.Generator().manual_seed(3)
    p, a = quantize_nf4(weight((n, k), seed=4))
    x = torch.randn(*x_shape, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(*x_shape[:-1], n, generator=g).to(dtype).to(DEVICE)
    w64 = dequantize_nf4(p, a, (n, k), 64, torch.float64 if dtype == torch.float32 else dtype).double()
    ref_y, ref_dx = F.linear(x.double(), w64), dy.double() @ w64
    wt = dequantize_nf4(p, a, (n, k), 64, dtype)  # torch's own op in the dtype: the yardstick
    xt = x.clone().requires_grad_()
    base_y = F.linear(xt, wt)
    base_y.backward(dy)
    xg = x.clone().requires_grad_()
    with poisoned():
        y = nf4_matmul(xg, p, a, (n, k), 64, backend="triton")
        y.backward(dy)
    assert y.shape == ref_y.shape and y.dtype == dtype and xg.grad.dtype == dtype
    for name, out, ref, base in (("y", y, ref_y, base_y), ("dx", xg.grad, ref_dx, xt.grad)):
        budget = 1e-5 if dtype == torch.float32 else 3 * rel_err(base, ref) + torch.finfo(dtype).eps / 2
        e = rel_err(out, ref)
        assert math.isfinite(e) and e <= budget, f"{name}: err {e:.2e} > budget {budget:.2e} ({x_shape}, {n}, {dtype})"


@triton_ok
def test_double_quant_matmul_rebuilds_absmax_and_saves_only_stored_tensors():
    """nf4_matmul_dq equals nf4_matmul on the rebuilt absmax (y and dx), and what autograd
    keeps for backward is the stored codes and scales alone: no fp32 absmax (0.5 bit a
    parameter) lives from the forward to the backward."""
    n, k = 130, 96
    p, a = quantize_nf4(weight((n, k), seed=8))
    codes, scales, offset = quantize_absmax(a, 256)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    stored = {t.untyped_storage().data_ptr() for t in (p, codes, scales, offset, x)}
    saved_new = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in stored:
            saved_new.append(tuple(t.shape))
        return t

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    stored |= {xa.untyped_storage().data_ptr(), xb.untyped_storage().data_ptr()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_matmul_dq(xa, p, codes, scales, offset, (n, k), 64, 256, backend="triton")
    assert saved_new == []
    ref = nf4_matmul(xb, p, dequantize_absmax(codes, scales, offset, 256), (n, k), 64, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    assert torch.equal(y, ref) and torch.equal(xa.grad, xb.grad)
    with pytest.raises(TypeError, match="absmax_codes must be uint8"):
        nf4_matmul_dq(x, p, codes.float(), scales, offset, (n, k), backend="triton")


def check_matmul(m, n, k, dtype, blocksize=64, seed=0):
    """y and dx of nf4_matmul(backend="triton") against the float64 reference, as above."""
    g = torch.Generator().manual_seed(seed)
    p, a = quantize_nf4(weight((n, k), seed=seed + 1), blocksize)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(dtype).to(DEVICE)
    w64 = dequantize_nf4(p, a, (n, k), blocksize, torch.float64 if dtype == torch.float32 else dtype).double()
    with poisoned():
        y = nf4_matmul(x, p, a, (n, k), blocksize, backend="triton")
        y.backward(dy)
    for out, ref in ((y, F.linear(x.detach().double(), w64)), (x.grad, dy.double() @ w64)):
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert rel_err(out, ref) <= tol, (m, n, k, dtype, blocksize)


@triton_ok
@pytest.mark.parametrize("lut", ["regs", "l1"])
@pytest.mark.parametrize("n,k,blocksize", [(40, 128, 32), (40, 96, 128), (33, 128, 128), (9, 96, 96), (7, 37, 64)])
def test_both_read_paths_and_code_lookups(monkeypatch, lut, n, k, blocksize):
    """The rows path (K a multiple of blocksize and of BLOCK_K: with BLOCK_K 64, two absmax a
    tile row at blocksize 32 and one for two k-steps at 128) and the flat path (K = 96 with
    BLOCK_K 64, a blocksize of 96, odd K), each with the code as a select tree and as a table."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter's fixed tiles; a GPU autotunes")
    monkeypatch.setattr(nt, "INTERPRETER_CONFIG", (16, 32, 64, lut))
    assert nt.row_aligned(k, blocksize, 64) == (k % 64 == 0 and blocksize in (32, 128))
    check_matmul(5, n, k, torch.float32, blocksize)


@triton_ok
def test_large_m_dequantizes_then_calls_the_gemm(monkeypatch):
    """Above FUSED_MAX_M the triton backend writes W with the dequantize kernel and calls
    F.linear (dy @ W in the backward): same results within the same budgets."""
    assert fused_path(nf4_mod.FUSED_MAX_M) and not fused_path(nf4_mod.FUSED_MAX_M + 1)
    monkeypatch.setattr(nf4_mod, "FUSED_MAX_M", 2)
    calls = []
    monkeypatch.setattr(nt, "matmul_fwd_triton", lambda *a: calls.append(a))  # must not run
    for dtype in (torch.float32, torch.float16):
        check_matmul(3, 40, 96, dtype)
    assert calls == []


def test_crossover_follows_the_cost_model():
    m_star = crossover_m()
    assert 200 < m_star < 300 and abs(m_star - nf4_mod.FUSED_MAX_M) / m_star < 0.1
    # by hand: (0.5625 + 2) bytes · P / (2 · BW · (1/e_f - 1/e_c))
    assert m_star == pytest.approx(2.5625 * 989e12 / (2 * 3.35e12 * (1 / 0.35 - 1 / 0.75)))
    assert crossover_m(0.5) > m_star > crossover_m(0.2)     # a faster fused kernel wins longer
    assert crossover_m(0.75, 0.75) == math.inf
    assert crossover_m(bandwidth=2 * 3.35e12) == pytest.approx(m_star / 2)  # more bandwidth: the write costs less


@pytest.mark.skipif(not HAS_TRITON or DEVICE != "cpu" or not interpreter_on(),
                    reason="drives the GPU launch path through the interpreter")
def test_gpu_launch_path_autotunes_and_matches(monkeypatch):
    """The launch code a GPU takes for fp16 (autotuner, pruning by M, grid lambdas,
    ROW_ALIGNED from the chosen BLOCK_K), run by the interpreter with a stub timer."""
    monkeypatch.setattr(nt, "interpreter_on", lambda: False)
    for tuned in (nt._fwd_tuned, nt._bwd_tuned):
        monkeypatch.setattr(tuned, "_do_bench", lambda call, quantiles=None: (call(), [1.0, 1.0, 1.0])[1])
        monkeypatch.setattr(tuned, "cache", {})
    check_matmul(5, 70, 128, torch.float16)
    assert all(len(t.cache) == 1 for t in (nt._fwd_tuned, nt._bwd_tuned))
    best = nt._fwd_tuned.cache[next(iter(nt._fwd_tuned.cache))]
    assert best.kwargs["BLOCK_M"] == 16  # decode-sized M prunes to the decode tiles


def test_torch_backend_matmul_is_dequantize_then_linear():
    p, a = quantize_nf4(weight((96, 128)))
    x = torch.randn(3, 128, device=DEVICE, requires_grad=True)
    y = nf4_matmul(x, p, a, (96, 128), backend="torch")
    assert torch.equal(y, F.linear(x, dequantize_nf4(p, a, (96, 128))))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_ok)])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear(backend, compute_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(192, 130).to(DEVICE)
    m = NF4Linear.from_linear(lin, blocksize=64, compute_dtype=compute_dtype, backend=backend)
    assert [n for n, _ in m.named_parameters()] == ["bias"] and m.bias.dtype == compute_dtype
    assert {n for n, _ in m.named_buffers()} == {"packed", "absmax"}
    assert m.packed.numel() == 192 * 130 // 2 and "packed" in m.state_dict()
    x = torch.randn(2, 5, 192, device=DEVICE, requires_grad=True)
    y = m(x)
    ref = F.linear(x.detach().to(compute_dtype), m.dequantized_weight()) + m.bias.detach()  # bias added after
    assert y.dtype == compute_dtype
    if backend == "torch":
        assert torch.equal(y, ref)
    else:
        tol = 1e-5 if compute_dtype == torch.float32 else 2e-2
        assert rel_err(y.detach(), ref.double()) <= tol
    y.float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert m.bias.grad is not None and torch.allclose(m.bias.grad.float(), torch.full((130,), 10.0))


def test_nf4_linear_without_bias_quantizes_like_quantize_nf4():
    lin = nn.Linear(64, 10, bias=False)
    m = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    p, a = quantize_nf4(lin.weight)
    assert m.bias is None and list(m.parameters()) == [] and torch.equal(m.packed, p) and torch.equal(m.absmax, a)


# ---------------------------------------------------------------------------------------
# Cost model and bad input
# ---------------------------------------------------------------------------------------
def test_cost_model():
    assert flops(8, 4096, 4096) == 2 * 8 * 4096 * 4096
    fused = bytes_moved(1, 4096, 4096, dtype_bytes=2)
    unfused = bytes_moved(1, 4096, 4096, dtype_bytes=2, fused=False)
    w_bytes = 4096 * 4096 // 2 + 4 * 4096 * 4096 // 64
    assert fused == w_bytes + 2 * (4096 + 4096)
    assert unfused - fused == 2 * 2 * 4096 * 4096
    assert 7.5 < unfused / fused < 8.2  # decode: W dominates, ~8x fewer bytes fused


def test_bad_input():
    p, a = quantize_nf4(weight((8, 64)))
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_nf4(p[:-1], a, (8, 64))
    with pytest.raises(ValueError, match="last dim"):
        nf4_matmul(torch.randn(2, 63), p, a, (8, 64))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(p.int(), a, (8, 64))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(weight((8, 64)), blocksize=63)
    with pytest.raises(TypeError, match="dtype"):
        quantize_nf4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        nf4_matmul(torch.randn(2, 64), p, a, (8, 64), backend="cuda")


# ---------------------------------------------------------------------------------------
# Compiled for a GPU (any machine): every autotune candidate, no spills
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_a_gpu(tmp_path):
    """Every autotune candidate of both matmul kernels (bf16), the fp32 tile, the flat path
    and the dequantize kernel compile for sm_90a, and none spills registers (read from the
    cubin with the cuobjdump that Triton's wheel ships, where it does)."""
    compile_in_subprocess(__file__, tmp_path)


@pytest.mark.exhaustive
def test_kernels_compile_for_sm80_without_spills(tmp_path, monkeypatch):
    """The same for Ampere (sm_80), with its own candidate list (nf4_triton.arch_configs(80))."""
    monkeypatch.setenv("LTK_COMPILE_CC", "80")
    compile_in_subprocess(__file__, tmp_path)


def _spill_bytes(cubin: bytes, tmp: str) -> int | None:
    """STACK + LOCAL bytes of the kernel (ptxas puts spills there), or None without cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return sum(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", usage))


def _compile_all():
    import tempfile

    import triton
    from compile_check import require_nvidia_compiler

    GPUTarget, ASTSource = require_nvidia_compiler()
    tmp = tempfile.mkdtemp()

    def build(fn, dtype, consts, warps, stages, aligned=True):
        io = dict(X=dtype, Y=dtype, DY=dtype, DX=dtype, OUT=dtype, PACKED="u8", ABSMAX="fp32", CODE="fp32")
        sig = {a: "constexpr" if a in consts else "*" + io[a] if a in io else "i32" for a in fn.arg_names}
        # what a launch on contiguous tensors with K, N multiples of 16 specializes on
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if aligned and (a in io or a in ("N", "K"))}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32), options=dict(num_warps=warps, num_stages=stages))
        spills = _spill_bytes(k.asm["cubin"], tmp)
        assert spills in (0, None), f"{fn.__name__} {consts} num_warps={warps}: {spills} bytes of spills"

    fwd, bwd = nt._matmul_fwd_kernel, nt._matmul_bwd_kernel
    cc = int(os.environ.get("LTK_COMPILE_CC", "90"))  # sm_90a by default; each architecture its own list
    runs = [(fn, c, "bf16", None, True) for fn, cs in ((fwd, nt.GPU_CONFIGS), (bwd, nt.BWD_CONFIGS))
            for c in nt.arch_configs(cc, cs)]
    for fn in (fwd, bwd):
        runs += [(fn, nt.FP32_CONFIG, "fp32", "ieee", True), (fn, nt.FLAT_CONFIG, "fp16", None, False)]  # flat path
    for fn, (bm, bn, bk, warps, stages, lut), dtype, prec, rows in runs:
        build(fn, dtype, dict(BLOCKSIZE=64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LUT=lut, ROW_ALIGNED=rows,
                              FP32_DOTS=False, DOT_PRECISION=prec), warps, stages, aligned=rows)
    build(nt._dequant_kernel, "bf16", dict(BLOCKSIZE=64, BLOCK=nt._DEQUANT_BLOCK), 4, 3)
