"""Triton kernels for NF4 weights (ltk/kernels/nf4.py holds the format, the references, the API
and the dispatch between these kernels and dequantize + cuBLAS).

Storage (ltk/kernels/nf4.py): a weight W of shape (N, K) is read as a flat vector w of N·K
elements, w[i] = W[i // K, i % K]. Element i is the 4-bit code in byte i // 2 of `packed`
(the high nibble for even i, the low one for odd i) and its block is i // blocksize:

    W[n, k] = CODE[nibble(n·K + k)] · absmax[(n·K + k) // blocksize]      (fp32 product)

Two ways to read a (BLOCK_N, BLOCK_K) tile of W, picked per launch (constexpr ROW_ALIGNED):
  * rows (K % blocksize == 0, K % BLOCK_K == 0, BLOCK_K and blocksize powers of two, one a
    multiple of the other, as in every LLM layer): a row of W starts on a byte and on a block,
    so the tile is a (BLOCK_N, BLOCK_K/2) tile of bytes (row stride K/2) split into nibbles in
    registers, and the scales are a (BLOCK_N, max(1, BLOCK_K/blocksize)) tile of absmax (row
    stride K/blocksize): one load each per k-step, no per-element index arithmetic.
  * flat (anything else: odd K, K not a multiple of blocksize): per-element int64 flat indices,
    a byte gather and a scale gather; blocksize is a compile-time constant, so `// blocksize`
    is a shift (or a multiply by a constant), never a call to the 64-bit division routine.

The 16 code values come from a 15-select tree on the nibble's bits (LUT="regs": the table is
instruction immediates, no memory access) or from the 64-byte table in global memory, an L1
hit after the first k-step (LUT="l1": one load an element, no selects). The select tree costs
issue slots on the integer pipe, the table costs load-store slots; the autotuner measures
both (the static counts are in nf4.py's cost model).

Kernels:
  * `_dequant_kernel`: packed + absmax -> W in fp16/bf16/fp32 (one program, BLOCK elements).
  * `_matmul_fwd_kernel`: y = x · Wᵀ, (M, K) · (K, N). A program owns a (BLOCK_M, BLOCK_N)
    tile of y and walks K in steps of BLOCK_K, dequantizing the (BLOCK_N, BLOCK_K) tile of W in
    registers from 0.5 byte a weight + one absmax a block; W is never written to memory.
  * `_matmul_bwd_kernel`: dx = dy · W, (M, N) · (N, K). A program owns a (BLOCK_M, BLOCK_K)
    tile of dx and walks N, dequantizing (BLOCK_N, BLOCK_K) tiles of W the same way. W is
    frozen (QLoRA: only adapters train), so there is no dW kernel.

Arithmetic: the dequantized value is formed in fp32 (code · absmax, exactly as the reference),
then rounded to x's dtype for the dot (tensor cores on a GPU; fp32 inputs use IEEE fp32 dots,
not TF32). Under the interpreter the same rounding is applied and the dot then runs in fp32
(bf16 arithmetic is not right in the interpreter). Accumulation is fp32; the output is cast
on store.
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import HAS_TRITON, device_arch, interpreter_on
from ltk.kernels.poison import output_allocator

# Fill every output with NaN before launch (tests), so an element a kernel forgets to write
# fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False
_DEQUANT_BLOCK = 1024
# (BLOCK_M, BLOCK_N, BLOCK_K, LUT) under the interpreter: small tiles, its cost grows with tile size
INTERPRETER_CONFIG = (16, 32, 32, "regs")
# GPU candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, LUT) for fp16/bf16, each
# compiled for sm_90a in the tests with zero spills. BLOCK_M 16 is decode (M ≤ 16: the
# kernel streams W, so wide BLOCK_N·BLOCK_K tiles and deep pipelining); 64 and 128 are
# the prefill tiles up to nf4.FUSED_MAX_M, above which nf4.py dequantizes and calls cuBLAS.
GPU_CONFIGS = (
    (16, 64, 128, 4, 3, "regs"), (16, 128, 64, 4, 4, "regs"),
    (64, 64, 64, 4, 4, "regs"), (64, 64, 64, 4, 4, "l1"),
    (128, 64, 64, 8, 3, "regs"), (128, 64, 64, 8, 3, "l1"), (64, 128, 64, 8, 3, "regs"),
)
# the dx kernel: the same but the decode tile with BLOCK_K 128, which spills 8 bytes there
BWD_CONFIGS = tuple(c for c in GPU_CONFIGS if c[:3] != (16, 64, 128))
# Ampere (sm_8x): the candidates above that spill there, replaced. 128×64×64 w8 s3 with the
# select-tree code: ptxas keeps 2 CTAs of 256 threads (128 registers) and spills 8 B; with
# one stage less it takes 174 registers, no spill, and the same loop (1,285 SASS a k-step)
AMPERE_REPLACE = {(128, 64, 64, 8, 3, "regs"): (128, 64, 64, 8, 2, "regs")}
ARCHS = (90, 80)  # compute capabilities with a list each: sm_90 and later take GPU_CONFIGS, sm_8x Ampere's


def arch_configs(arch: int, configs=GPU_CONFIGS) -> tuple:
    """`configs` (GPU_CONFIGS or BWD_CONFIGS) as compiled for compute capability `arch` (90, 80):
    the one list the pruner at launch, the compile tests and the static report all read."""
    if arch >= 90:
        return tuple(configs)
    return tuple(dict.fromkeys(AMPERE_REPLACE.get(c, c) for c in configs))
# fp32 inputs: IEEE fp32 dots on the FMA units, not the tensor cores: one modest tile, no
# tuning (fp32 is the exact path, fp16/bf16 the fast one)
FP32_CONFIG = (32, 32, 32, 4, 2, "regs")
# W not row-aligned (odd K, K not a multiple of a power-of-two blocksize or of 64): the flat
# path, whose per-element gathers spill at the tuned tiles; this one tile, no tuning
FLAT_CONFIG = FP32_CONFIG


_empty = output_allocator(__name__)  # NaN-filled outputs while POISON_OUTPUTS is set (tests)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def row_aligned(k: int, blocksize: int, block_k: int) -> bool:
    """Whether the rows path reads W (see the module docstring)."""
    return (k % blocksize == 0 and k % block_k == 0 and is_pow2(blocksize) and is_pow2(block_k)
            and block_k >= 16)


def m_bucket(m: int) -> int:
    """The autotune key for M: its power-of-two ceiling, capped (a new decode length or
    batch does not re-tune)."""
    return min(1 << max(m - 1, 0).bit_length(), 256)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_code(q):
        """NF4[q] (fp32) for int32 q in [0, 16): a select tree on q's bits, 8 + 4 + 2 + 1
        selects between immediates (the values of nf4.NF4_CODE, to the last bit)."""
        b0 = (q & 1) != 0
        b1 = (q & 2) != 0
        b2 = (q & 4) != 0
        p0 = tl.where(b0, -0.6961928009986877, -1.0)
        p1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
        p2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
        p3 = tl.where(b0, 0.0, -0.09105003625154495)
        p4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
        p5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
        p6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
        p7 = tl.where(b0, 1.0, 0.7229568362236023)
        lo = tl.where(b2, tl.where(b1, p3, p2), tl.where(b1, p1, p0))
        hi = tl.where(b2, tl.where(b1, p7, p6), tl.where(b1, p5, p4))
        return tl.where(q >= 8, hi, lo).to(tl.float32)

    @triton.jit
    def _code_of(q, CODE, LUT: tl.constexpr):
        if LUT == "regs":
            return _nf4_code(q)
        else:
            return tl.load(CODE + q)                                 # 64-byte table: L1-resident

    @triton.jit
    def _dequant_rows(PACKED, ABSMAX, CODE, rn, k0, n_ok, K, BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, LUT: tl.constexpr):
        """fp32 W[rn, k0:k0 + BLOCK_K], (BLOCK_N, BLOCK_K), when rows start on a byte and a block."""
        row = rn.to(tl.int64)[:, None]                               # (BLOCK_N, 1)
        byte = tl.load(PACKED + row * (K // 2) + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :],
                       mask=n_ok[:, None], other=0).to(tl.int32)     # (BLOCK_N, BLOCK_K / 2)
        q = tl.interleave(byte >> 4, byte & 15)                      # (BLOCK_N, BLOCK_K), high nibble first
        code = _code_of(q, CODE, LUT)
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1   # blocks a row of the tile
        s = tl.load(ABSMAX + row * (K // BLOCKSIZE) + (k0 // BLOCKSIZE + tl.arange(0, NB))[None, :],
                    mask=n_ok[:, None], other=0.0)                   # (BLOCK_N, NB)
        if NB == 1:
            return code * s
        else:
            w = tl.reshape(code, (BLOCK_N, NB, BLOCK_K // NB)) * s[:, :, None]  # (BLOCK_N, NB, blocksize)
            return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _dequant_flat(PACKED, ABSMAX, CODE, flat, mask, BLOCKSIZE: tl.constexpr, LUT: tl.constexpr):
        """fp32 weights at int64 flat indices `flat` (any shape); a byte or a block may straddle rows."""
        byte = tl.load(PACKED + (flat >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.where((flat & 1) == 0, byte >> 4, byte & 15)          # even element: high nibble
        scale = tl.load(ABSMAX + flat // BLOCKSIZE, mask=mask, other=0.0)
        return _code_of(q, CODE, LUT) * scale

    @triton.jit
    def _dequant_kernel(PACKED, ABSMAX, CODE, OUT, numel, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        half = tl.program_id(0).to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # byte indices
        byte = tl.load(PACKED + half, mask=half < (numel + 1) // 2, other=0).to(tl.int32)
        q = tl.interleave(byte >> 4, byte & 15)                      # (BLOCK,), flat order
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = _nf4_code(q) * tl.load(ABSMAX + offs // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(OUT + offs, w.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _matmul_fwd_kernel(X, PACKED, ABSMAX, CODE, Y, M, N, K, M_BUCKET, BLOCKSIZE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           LUT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                           FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Y[m, n] = Σ_k X[m, k] · W[n, k] for this program's (BLOCK_M, BLOCK_N) tile."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)     # (BLOCK_N,)
        rk = tl.arange(0, BLOCK_K)                                  # (BLOCK_K,)
        m_ok, n_ok = rm < M, rn < N
        x_ptr = X + rm.to(tl.int64)[:, None] * K + rk[None, :]      # (BLOCK_M, BLOCK_K), advanced by BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if ROW_ALIGNED:
                x = tl.load(x_ptr, mask=m_ok[:, None], other=0.0)
                w = _dequant_rows(PACKED, ABSMAX, CODE, rn, k0, n_ok, K, BLOCKSIZE, BLOCK_N, BLOCK_K, LUT)
            else:
                k_ok = (k0 + rk) < K
                x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                flat = rn.to(tl.int64)[:, None] * K + (k0 + rk)[None, :]  # (BLOCK_N, BLOCK_K)
                w = _dequant_flat(PACKED, ABSMAX, CODE, flat, n_ok[:, None] & k_ok[None, :], BLOCKSIZE, LUT)
            w = w.to(X.dtype.element_ty)
            if FP32_DOTS:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            x_ptr += BLOCK_K
        y_mask = m_ok[:, None] & n_ok[None, :]
        tl.store(Y + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _matmul_bwd_kernel(DY, PACKED, ABSMAX, CODE, DX, M, N, K, M_BUCKET, BLOCKSIZE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           LUT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                           FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """DX[m, k] = Σ_n DY[m, n] · W[n, k] for this program's (BLOCK_M, BLOCK_K) tile."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)                             # (BLOCK_K,)
        m_ok, k_ok = rm < M, rk < K
        dy_ptr = DY + rm.to(tl.int64)[:, None] * N + tl.arange(0, BLOCK_N)[None, :]  # (BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)                         # (BLOCK_N,)
            n_ok = rn < N
            dy = tl.load(dy_ptr, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if ROW_ALIGNED:
                w = _dequant_rows(PACKED, ABSMAX, CODE, rn, k0, n_ok, K, BLOCKSIZE, BLOCK_N, BLOCK_K, LUT)
            else:
                flat = rn.to(tl.int64)[:, None] * K + rk[None, :]   # (BLOCK_N, BLOCK_K)
                w = _dequant_flat(PACKED, ABSMAX, CODE, flat, n_ok[:, None] & k_ok[None, :], BLOCKSIZE, LUT)
            w = w.to(DY.dtype.element_ty)
            if FP32_DOTS:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            dy_ptr += BLOCK_N
        dx_mask = m_ok[:, None] & k_ok[None, :]
        tl.store(DX + rm.to(tl.int64)[:, None] * K + rk[None, :], acc.to(DX.dtype.element_ty), mask=dx_mask)


    _ALIGNED = {"ROW_ALIGNED": lambda a: row_aligned(a["K"], a["BLOCKSIZE"], a["BLOCK_K"])}
    _KEY = ["M_BUCKET", "N", "K", "BLOCKSIZE"]  # and the tensors' dtypes, which the autotuner adds

    def gpu_configs(configs=GPU_CONFIGS, arch: int | None = None) -> list:
        """fp16/bf16 autotune candidates as triton.Config: those of compute capability `arch`, or
        with None those of every architecture (the autotuner's list; pruned by arch and M per launch)."""
        tiles = arch_configs(arch, configs) if arch else [c for a in ARCHS for c in arch_configs(a, configs)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "LUT": lut}, num_warps=w, num_stages=s)
                for m, n, k, w, s, lut in dict.fromkeys(tiles)]

    def _prune_by_m(configs, named_args, **kwargs):
        """This device's candidates (`arch_configs`); of those, decode (M ≤ 16) takes the BLOCK_M
        16 tiles, anything longer the tall ones up to M; only tiles whose BLOCK_K reads W by rows."""
        ours = {str(c) for c in gpu_configs(GPU_CONFIGS, device_arch())}
        configs = [c for c in configs if str(c) in ours]
        mb, k, bs = named_args["M_BUCKET"], named_args["K"], kwargs.get("BLOCKSIZE", named_args.get("BLOCKSIZE"))
        keep = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == (mb <= 16) and c.kwargs["BLOCK_M"] <= max(64, mb)
                and row_aligned(k, bs, c.kwargs["BLOCK_K"])]
        return keep or [c for c in configs if c.kwargs["BLOCK_K"] == 64]

    _fwd_h = triton.heuristics(_ALIGNED)(_matmul_fwd_kernel)
    _bwd_h = triton.heuristics(_ALIGNED)(_matmul_bwd_kernel)
    _PRUNE = {"early_config_prune": _prune_by_m}
    _fwd_tuned = triton.autotune(gpu_configs(), key=_KEY, prune_configs_by=_PRUNE)(_fwd_h)
    _bwd_tuned = triton.autotune(gpu_configs(BWD_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(_bwd_h)


def _launch(tuned, plain, grid_of, dtype, k, blocksize, *args):
    """Fixed tiles under the interpreter, for fp32 inputs and for the flat path; the
    autotuner otherwise. grid_of(BLOCK_M, BLOCK_N, BLOCK_K) -> the launch grid."""
    fixed = FP32_CONFIG if dtype == torch.float32 else FLAT_CONFIG
    if interpreter_on() or dtype == torch.float32 or not row_aligned(k, blocksize, 64):
        bm, bn, bk, lut = INTERPRETER_CONFIG if interpreter_on() else fixed[:3] + fixed[5:]
        opts = {} if interpreter_on() else dict(num_warps=fixed[3], num_stages=fixed[4])
        plain[grid_of(bm, bn, bk)](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LUT=lut,
                                   FP32_DOTS=interpreter_on(), DOT_PRECISION="ieee" if dtype == torch.float32 else None,
                                   **opts)
    else:
        tuned[lambda a: grid_of(a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"])](*args, FP32_DOTS=False, DOT_PRECISION=None)


def dequantize_triton(packed, absmax, code, numel: int, blocksize: int, dtype) -> torch.Tensor:
    """The flat (numel,) dequantized weight in `dtype`. `code` is unused: the kernel holds the
    NF4 values in registers (kept in the signature so every launcher takes the same tensors)."""
    out = _empty((numel,), dtype, packed.device)
    if numel:
        _dequant_kernel[(triton.cdiv(numel, _DEQUANT_BLOCK),)](
            packed, absmax, code, out, numel, BLOCKSIZE=blocksize, BLOCK=_DEQUANT_BLOCK)
    return out


def matmul_fwd_triton(x2, packed, absmax, code, n: int, blocksize: int) -> torch.Tensor:
    """y (M, N) = x2 (M, K) · Wᵀ, x2 contiguous."""
    m, k = x2.shape
    y = _empty((m, n), x2.dtype, x2.device)
    if m and n:
        _launch(_fwd_tuned, _fwd_h, lambda bm, bn, bk: (triton.cdiv(m, bm), triton.cdiv(n, bn)), x2.dtype, k, blocksize,
                x2, packed, absmax, code, y, m, n, k, m_bucket(m), blocksize)
    return y


def matmul_bwd_triton(dy2, packed, absmax, code, k: int, blocksize: int) -> torch.Tensor:
    """dx (M, K) = dy2 (M, N) · W, dy2 contiguous."""
    m, n = dy2.shape
    dx = _empty((m, k), dy2.dtype, dy2.device)
    if m and k:
        _launch(_bwd_tuned, _bwd_h, lambda bm, bn, bk: (triton.cdiv(m, bm), triton.cdiv(k, bk)), dy2.dtype,
                k, blocksize, dy2, packed, absmax, code, dx, m, n, k, m_bucket(m), blocksize)
    return dx
