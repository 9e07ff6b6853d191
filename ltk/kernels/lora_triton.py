"""Triton kernels for the fused LoRA linear (ltk/kernels/lora.py holds the math, the reference,
the autograd function and the API).

Two kernels serve forward and backward alike:

  * `_skinny_kernel`: OUT (M, R) = X (M, L) · Pᵀ, P an (R, L) matrix given by strides, R
    small (the LoRA rank). fp32 output. Forward: u = x · Aᵀ (P = A). Backward: g = dy · B
    (P = Bᵀ, the (N, r) B read with swapped strides, no copy). A program owns BLOCK_M rows
    and walks L; the (BLOCK_M, BLOCK_R) accumulator is tiny.
  * `_gemm_lowrank_kernel`: C (M, O) = X (M, L) · Pᵀ + s · V (M, R) · Qᵀ (+ bias), with P
    (O, L) and Q (O, R) given by strides. A program owns a (BLOCK_M, BLOCK_O) tile of C: it
    walks L for the main GEMM, then in the epilogue walks R in BLOCK_R = 16 steps, adding
    s · V_tile · Q_tileᵀ into the same fp32 accumulator, then the bias, and stores C once.
      forward   y  = x · Wᵀ + s · u · Bᵀ + b     P = W (N, K),            Q = B (N, r)
      backward  dx = dy · W + s · g · A          P = Wᵀ (K, N) by strides, Q = Aᵀ (K, r) by strides
    On a GPU the tiles are autotuned (`TC_TILES`, keyed on M rounded up to a power of two, O,
    L) and laid out in grouped order: GROUP_M row blocks walk each column block together, so
    the CTAs resident at once read the same weight tiles (from L2) instead of GROUP_M times
    as many. Rows past M and O are wrapped onto real rows for the loads (computed, never
    stored), so the loop's loads carry no row masks and only a ragged last k-step is masked
    (EVEN_L): the loads vectorize and pipeline (cp.async) on Ampere and Hopper.

Compiled for sm_90a (bf16, Triton 3.9, specialized as launched: unit strides constant, sizes
divisible by 16), the inner loop, one k-step of BLOCK_L = 64:
                 tile      warps  SASS/warp  tensor-core       FLOP/operand byte  FLOP/warp-instr
  before fwd   64×64       4      100        4 HGMMA.64x64x16  32                 1,311
  before dx    64×64       4      144        4 HGMMA.64x64x16  32                   910
  now    fwd   128×256     8      124        4 HGMMA.64x256x16 85                 4,228  (3.2×)
  now    dx    128×256     8      103        4 HGMMA.64x256x16 85                 5,090  (5.6×)
both with cp.async loads; no candidate of an architecture's list (`arch_tiles`) spills on sm_90a
or sm_80 (tests/kernels/test_lora_kernel.py compiles every one; sm_80 in its exhaustive test).
W is addressed as Pᵀ's (BLOCK_L, BLOCK_O) tile: loaded as a (BLOCK_O, BLOCK_L) tile and
transposed, dx (W's unit stride along O) spilled 0.1-21 KB per thread on sm_80.

Arithmetic: the main GEMM runs in the input dtype with fp32 accumulation (IEEE fp32 dots for
fp32 inputs, not TF32). u and g are kept in fp32 (M·r·4 bytes: negligible) so the low-rank
term loses nothing to an intermediate rounding; the epilogue dot is fp32 (IEEE for fp32
inputs, TF32 for fp16/bf16 inputs, whose outputs are coarser than TF32 anyway). Under the
interpreter every dot runs on fp32 values (bf16 arithmetic is wrong there). Output cast on
store.
"""
from __future__ import annotations

import torch

from ltk.kernels.backend import HAS_TRITON, device_arch, interpreter_on
from ltk.kernels.poison import output_allocator

POISON_OUTPUTS = False             # NaN-filled outputs (tests): see ltk/kernels/poison.py
_empty = output_allocator(__name__)
# GPU candidates of the GEMM, (BLOCK_M, BLOCK_O, BLOCK_L, num_warps, num_stages), fp16/bf16:
# FLOP per operand byte of a k-step, 2·BM·BO / ((BM + BO)·2): 85 at 128×256 and 256×128 (what
# cuBLAS runs at large sizes), 64 at 128×128, 43 at 64×128 (more CTAs when M·O is small).
# Each fits sm_80's 164 KiB of shared memory and compiles for sm_90a and sm_80 without spills
# (tests/kernels/test_lora_kernel.py compiles every one; `arch_tiles` is each architecture's list).
TC_TILES = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
            (64, 128, 64, 4, 4))
# Ampere (sm_8x): mma.sync's fragments take more registers; with M not a multiple of 16 (the
# epilogue's row masks) 256×128 w8 spills 208 B (fwd) / 388 B (dx) at 255 registers, and
# 128×128 w4 228 B in dx: dropped there; 128×256 w8 keeps the 85 FLOP per operand byte
AMPERE_DROP = {(256, 128, 64, 8, 3), (128, 128, 64, 4, 4)}
ARCHS = (90, 80)  # compute capabilities with a list each: sm_90 and later take TC_TILES, sm_8x Ampere's


def arch_tiles(arch: int) -> tuple:
    """The fp16/bf16 GEMM candidates for compute capability `arch` (90, 80): the one list the
    pruner at launch, the compile tests and the static report all read."""
    return TC_TILES if arch >= 90 else tuple(t for t in TC_TILES if t not in AMPERE_DROP)
# fp32 inputs: IEEE fp32 dots run on the FMA units, not the tensor cores (the cost model in
# lora.py sends fp32 to cuBLAS on a GPU): one modest tile, no tuning
FP32_TILE = (64, 64, 32, 4, 3)
GROUP_M = 8                        # row blocks per group of the grouped (swizzled) tile order
INTERPRETER_TILES = (16, 32, 32)   # small tiles: the interpreter's cost grows with tile size
SKINNY_BLOCK_M = 32                # more programs for the thin u / g products
SKINNY_BLOCK_L = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 16}  # fp32 FMA dots: operands in registers
RANK_STEP = 16                     # the GEMM's epilogue walks r this many columns at a time (BLOCK_R)
MAX_RANK = 128                     # u, g stay small beside the GEMM's operands (and the tests cover it)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(X, P, OUT, M, L, R, stride_pr, stride_pl,
                       BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """OUT[m, j] = Σ_l X[m, l] · P[j, l] for this program's BLOCK_M rows, fp32."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # (BLOCK_M,)
        rr = tl.arange(0, BLOCK_R)                                  # (BLOCK_R,)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)                         # (BLOCK_L,)
            x = tl.load(X + rm.to(tl.int64)[:, None] * L + rl[None, :],
                        mask=(rm[:, None] < M) & (rl[None, :] < L), other=0.0)
            p = tl.load(P + rr.to(tl.int64)[:, None] * stride_pr + rl[None, :].to(tl.int64) * stride_pl,
                        mask=(rr[:, None] < R) & (rl[None, :] < L), other=0.0)  # (BLOCK_R, BLOCK_L)
            if FP32_DOTS:
                x = x.to(tl.float32)
                p = p.to(tl.float32)
            acc = tl.dot(x, tl.trans(p), acc, input_precision=DOT_PRECISION)
        tl.store(OUT + rm.to(tl.int64)[:, None] * R + rr[None, :], acc,
                 mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _gemm_lowrank_kernel(X, P, V, Q, BIAS, C, M, O, L, R, scale, M_BUCKET,
                             stride_po, stride_pl, stride_qo, stride_qr,
                             HAS_BIAS: tl.constexpr, EVEN_L: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, FP32_DOTS: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, EPI_PRECISION: tl.constexpr):
        """C[m, o] = Σ_l X[m, l] · P[o, l] + scale · Σ_j V[m, j] · Q[o, j] (+ BIAS[o]).
        M_BUCKET (M rounded up to a power of two) is only the autotuner's key."""
        # grouped order: GROUP_M row blocks take turns on each column block, so the CTAs
        # resident together share their P (weight) tiles in L2 instead of each streaming its own
        pid = tl.program_id(0)
        n_m, n_o = tl.cdiv(M, BLOCK_M), tl.cdiv(O, BLOCK_O)
        in_group = GROUP_M * n_o
        first_m = (pid // in_group) * GROUP_M
        rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % rows_in_group
        pid_o = (pid % in_group) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                # (BLOCK_M,)
        ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)                # (BLOCK_O,)
        rl = tl.arange(0, BLOCK_L)                                  # (BLOCK_L,)
        # rows past M and O are wrapped onto real ones (read, never stored), so the loop's
        # loads need no row masks: only the ragged last k-step is masked, and only if L is
        x_ptrs = X + (rm % M).to(tl.int64)[:, None] * L + rl[None, :]                  # (BLOCK_M, BLOCK_L)
        # Pᵀ's (BLOCK_L, BLOCK_O) tile addressed as such (not a (BLOCK_O, BLOCK_L) tile transposed after
        # the load): for dx, where O is P's unit stride, the loads then run along the unit stride
        p_ptrs = P + rl.to(tl.int64)[:, None] * stride_pl + (ro % O).to(tl.int64)[None, :] * stride_po
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):                             # the main GEMM
            if EVEN_L:
                x = tl.load(x_ptrs)
                p = tl.load(p_ptrs)                                 # (BLOCK_L, BLOCK_O)
            else:
                x = tl.load(x_ptrs, mask=rl[None, :] < L - l0, other=0.0)
                p = tl.load(p_ptrs, mask=rl[:, None] < L - l0, other=0.0)
            if FP32_DOTS:
                x = x.to(tl.float32)
                p = p.to(tl.float32)
            acc = tl.dot(x, p, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_L
            p_ptrs += BLOCK_L * stride_pl
        # epilogue: the low-rank term, (BLOCK_M, r) · (r, BLOCK_O) in BLOCK_R-wide steps of r into
        # the same accumulator: whatever the rank, only (BLOCK_M + BLOCK_O) · BLOCK_R more values
        # are live (a whole-rank tile, or a second fp32 accumulator, spills at the large tiles)
        m_ok, o_ok = rm < M, ro < O
        v_ptrs = V + rm.to(tl.int64)[:, None] * R                   # (BLOCK_M, 1)
        q_ptrs = Q + ro.to(tl.int64)[:, None] * stride_qo           # (BLOCK_O, 1)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)                         # (BLOCK_R,)
            v = tl.load(v_ptrs + rr[None, :], mask=m_ok[:, None] & (rr[None, :] < R), other=0.0) * scale  # fp32
            q = tl.load(q_ptrs + rr[None, :].to(tl.int64) * stride_qr,
                        mask=o_ok[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)  # (BLOCK_O, BLOCK_R)
            acc = tl.dot(v, tl.trans(q), acc, input_precision=EPI_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(C + rm.to(tl.int64)[:, None] * O + ro[None, :], acc.to(C.dtype.element_ty),
                 mask=m_ok[:, None] & o_ok[None, :])

    _EVEN = {"EVEN_L": lambda a: a["L"] % a["BLOCK_L"] == 0}
    _gemm_lowrank_h = triton.heuristics(_EVEN)(_gemm_lowrank_kernel)

    def _gpu_configs(fp32: bool | None = None, arch: int = 90) -> list:
        """The candidates for fp16/bf16 inputs (fp32=False) on compute capability `arch`, fp32
        inputs (True) or all of them (None: the autotuner's list, pruned at each launch by `_prune`)."""
        tiles = {False: arch_tiles(arch), True: (FP32_TILE,), None: TC_TILES + (FP32_TILE,)}[fp32]
        return [triton.Config({"BLOCK_M": m, "BLOCK_O": o, "BLOCK_L": k}, num_warps=w, num_stages=st)
                for m, o, k, w, st in tiles]

    def _prune(configs, named_args, **kwargs):
        keep = {str(c) for c in _gpu_configs(kwargs["DOT_PRECISION"] == "ieee", device_arch())}
        return [c for c in configs if str(c) in keep]

    _gemm_lowrank_tuned = triton.autotune(_gpu_configs(), key=["M_BUCKET", "O", "L", "HAS_BIAS", "DOT_PRECISION"],
                                          prune_configs_by={"early_config_prune": _prune})(_gemm_lowrank_h)


def block_r(r: int) -> int:
    """The rank padded to a power of two ≥ 16 (tl.dot's smallest dimension): the skinny
    kernel's accumulator width."""
    return max(16, 1 << max(0, (r - 1).bit_length()))


def _dot_args(dtype: torch.dtype) -> dict:
    return dict(FP32_DOTS=interpreter_on(), DOT_PRECISION="ieee" if dtype == torch.float32 else None)


def skinny_triton(x2: torch.Tensor, p: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """fp32 (M, r) = x2 (M, L) · pᵀ for p (r, L); with transpose=True p is (L, r) and the
    product is x2 · p (read by strides, no copy). x2 and p contiguous."""
    m, l_ = x2.shape
    r = p.shape[1] if transpose else p.shape[0]
    stride_pr, stride_pl = (1, r) if transpose else (l_, 1)
    out = _empty((m, r), torch.float32, x2.device)
    if m:
        bm, bl = (16, 32) if interpreter_on() else (SKINNY_BLOCK_M, SKINNY_BLOCK_L[x2.dtype])
        _skinny_kernel[(triton.cdiv(m, bm),)](
            x2, p, out, m, l_, r, stride_pr, stride_pl,
            BLOCK_M=bm, BLOCK_L=bl, BLOCK_R=block_r(r), **_dot_args(x2.dtype))
    return out


def _gemm_lowrank(x2, p, v, q, bias, out, o: int, strides: tuple[int, int, int, int], scale: float) -> None:
    """out (M, O) = x2 (M, L) · pᵀ + scale · v · qᵀ (+ bias), p (O, L) and q (O, r) by
    `strides` (stride_po, stride_pl, stride_qo, stride_qr); fixed tiles under the
    interpreter, autotuned ones on a GPU."""
    m, l_ = x2.shape
    r = v.shape[1]
    args = (x2, p, v, q, bias if bias is not None else p, out, m, o, l_, r, float(scale),
            triton.next_power_of_2(m), *strides)
    meta = dict(HAS_BIAS=bias is not None, BLOCK_R=RANK_STEP, GROUP_M=GROUP_M, **_dot_args(x2.dtype),
                EPI_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")
    if interpreter_on():
        bm, bo, bl = INTERPRETER_TILES
        _gemm_lowrank_h[(triton.cdiv(m, bm) * triton.cdiv(o, bo),)](*args, BLOCK_M=bm, BLOCK_O=bo, BLOCK_L=bl, **meta)
    else:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(o, c["BLOCK_O"]),)  # noqa: E731
        _gemm_lowrank_tuned[grid](*args, **meta)


def lora_fwd_triton(x2, weight, bias, u, lora_B, scale: float) -> torch.Tensor:
    """y (M, N) = x2 · Wᵀ + scale · u · Bᵀ (+ bias); u fp32 (M, r); all contiguous."""
    m, k = x2.shape
    n, r = lora_B.shape
    y = _empty((m, n), x2.dtype, x2.device)
    if m and n:
        _gemm_lowrank(x2, weight, u, lora_B, bias, y, n, (k, 1, r, 1), scale)
    return y


def lora_dx_triton(dy2, weight, g, lora_A, scale: float) -> torch.Tensor:
    """dx (M, K) = dy2 · W + scale · g · A; g fp32 (M, r); all contiguous."""
    m, n = dy2.shape
    r, k = lora_A.shape
    dx = _empty((m, k), dy2.dtype, dy2.device)
    if m and k:
        _gemm_lowrank(dy2, weight, g, lora_A, None, dx, k, (1, k, 1, k), scale)  # Wᵀ (K, N), Aᵀ (K, r) by strides
    return dx
