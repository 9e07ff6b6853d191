"""Fused scaled-dot-product attention (FlashAttention-2 style), forward and backward, in Triton.

Shapes (one naming across the project): B batch, H query heads, H_kv key/value heads
(H_kv divides H; H_kv < H is grouped-query attention, GQA), T queries, S keys, D head dim.

    q (B, H, T, D)    k, v (B, H_kv, S, D)    o (B, H, T, D)

Query head h reads key/value head h // (H / H_kv).

Forward, for one (batch, head), with the additive bias b and the mask M (0 where key j may be
attended by query i, −inf where not):

    S   = scale · Q Kᵀ + b + M                  (T, S)   scale = 1/sqrt(D) by default
    P   = softmax(S)        row-wise             (T, S)
    O   = P V                                    (T, D)
    LSE_i = log Σ_j exp(S_ij)                    (T,)     saved for the backward

The mask combines a key padding mask (key j of sequence b absent), causality and document
masking. CAUSAL CONVENTION: bottom-right aligned, as FlashAttention ≥ 2.1 — query i attends
key j iff j ≤ i + (S − T). When T == S this is the usual lower triangle (SDPA's `is_causal`);
when T < S (decoding with a KV cache) the last query sees every key; when T > S the first
T − S queries see no key at all. A query row with no key to attend (all masked by padding, by
causality, or by a bias of −inf) returns O_i = 0 and passes zero gradients, never NaN.

Document masking (packed sequences): with segment ids seg_q (B, T) and seg_k (B, S),

    allowed(i, j) = causal(i, j)  and  seg_q[i] == seg_k[j]

so several examples concatenated in one row attend only within themselves: with causality,
a block-diagonal of lower triangles (Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination", arXiv 2107.02027; flash-attn's varlen kernels get the same from
cumulative sequence lengths). The kernels compare the ids tile by tile and skip the tiles in
which no query shares a segment with any key (see `_fwd_blocks`).

Backward, given dO (Dao 2023, section 2.2 / Algorithm 2):

    dV  = Pᵀ dO                                  (S, D)
    dP  = dO Vᵀ                                  (T, S)
    D_i = Σ_j P_ij dP_ij = rowsum(dO ∘ O)_i      (T,)     (since O = P V)
    dS  = P ∘ (dP − D)                           (T, S)   the softmax Jacobian, row by row
    dQ  = scale · dS K                           (T, D)
    dK  = scale · dSᵀ Q                          (S, D)
    db  = dS, summed over the dimensions the bias was broadcast along

and for GQA dK, dV of a shared key/value head are the sums over the query heads that read it.

Algorithm. Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax", arXiv 1805.02867, Algorithm 3): the softmax of a row can be built one block of
keys at a time, keeping the running maximum m and the running sum l, and rescaling what
was accumulated when the maximum grows:

    m' = max(m, max_j S_ij)      l' = e^(m − m') l + Σ_j e^(S_ij − m')
    acc' = e^(m − m') acc + Σ_j e^(S_ij − m') V_j            O = acc / l,  LSE = m + log l

FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning", arXiv 2307.08691): Algorithm 1 (forward: one program per block of
queries, loop over key blocks, divide by l once at the end, save only O and LSE) and
Algorithm 2 (backward: recompute P = exp(S − LSE) block by block instead of storing it;
here split into a dK/dV kernel, one program per key block looping over query blocks, and a
dQ kernel, one program per query block looping over key blocks, so that no two programs
write the same output: no atomics, deterministic results).

Exponentials use exp2 with log2(e) folded into the scale: S·log2(e) is what is computed,
and e^x = 2^(x·log2 e), so the LSE saved by the kernels is in base 2 (an internal detail).

The I/O argument. Naive attention (`attention_reference` below) writes the T×S scores S to
HBM, reads them for the softmax, writes P and reads P again for PV: at least 4 passes over a
T×S matrix (8 bytes per score in bf16), and the backward as many again. For T = S = 8k and
H = 32 that is 4 GiB per pass, per layer and sequence — 16× the bytes of Q, K, V and O
together (the ratio is S / 4D at D = 128). Against 4·D FLOPs per score (QKᵀ and PV) that is
D/2 FLOP/byte, 64 at D = 128, while an H100 needs ~300 FLOP/byte (989 TFLOP/s of bf16
matmul over 3.35 TB/s of HBM) to keep its tensor cores busy: naive attention runs at the
speed of the memory. The fused kernel keeps the tiles of S and P in registers and shared
memory (SRAM) and touches HBM only to read Q, K, V and write O and the LSE:
O((T + S)·D) bytes per head (`bytes_moved` below) for the same 4·T·S·D FLOPs (`flops`
below). Its intensity, ~T·S·D / ((T + S)·D), grows with the sequence length (~T/2
FLOP/byte for T = S in bf16, 2048 at 4k): the kernel is bound by the tensor cores, and its
speed is measured as a fraction of their peak. The price is recomputing S and P in the
backward (5 matmuls instead of 4 there), cheap next to the memory it saves.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltk.kernels.backend import HAS_TRITON, check_float, check_same_device, interpreter_on, resolve_backend

__all__ = ["attention", "attention_reference", "flops", "bytes_moved"]

MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)  # the torch backend also runs in float64
LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x · log2 e)
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=

# Block sizes when the interpreter runs the kernels (programs run one after another on the
# CPU; a fixed config, no autotuning). BLOCK_M != BLOCK_N on purpose: the GPU configs are
# unequal too, and the causal loop bounds must be right for both orders.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}  # (BLOCK_M, BLOCK_N)
# Fill outputs with NaN before the kernels run, so that an element a kernel forgot to write
# cannot pass a test. None: on when the interpreter runs (tests), off on a GPU (speed).
POISON_OUTPUTS: bool | None = None


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_rows(base, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr,
                   CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
        """Load a (len(rows), BLOCK_D) tile of a (n_rows, HEAD_DIM) matrix whose last dim has
        stride 1; masks only where a constexpr says the tile may stick out (zeros there)."""
        ptrs = base + rows[:, None] * stride_row + cols[None, :]
        if CHECK_ROWS and CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        elif CHECK_ROWS:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        elif CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _store_rows(base, x, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr,
                    CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
        ptrs = base + rows[:, None] * stride_row + cols[None, :]
        x = x.to(base.dtype.element_ty)
        if CHECK_ROWS and CHECK_COLS:
            tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))
        elif CHECK_ROWS:
            tl.store(ptrs, x, mask=rows[:, None] < n_rows)
        elif CHECK_COLS:
            tl.store(ptrs, x, mask=cols[None, :] < HEAD_DIM)
        else:
            tl.store(ptrs, x)

    @triton.jit
    def _scores(s, q_idx, k_idx, bias_base, kpm_base, same, stride_bt, stride_bs, T, S, causal_offset,
                CAUSAL_STEP: tl.constexpr, CHECK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr):
        """Finish a tile of scores in log2 units: s = (scale·q·k)·log2e on entry; adds
        bias·log2e and sets −inf where the key may not be attended. q_idx / k_idx are the
        query / key indices broadcast to the tile's layout: (M,1)/(1,N) for an S tile,
        (1,M)/(N,1) for an Sᵀ tile, so the same code serves both; `same` (HAS_SEG) is the
        tile of seg_q[i] == seg_k[j] in that layout."""
        if HAS_SEG:  # document masking: a key of another segment is never attended
            s = tl.where(same, s, float("-inf"))
        if HAS_BIAS:
            # int64: a (T, S) bias plane can pass 2^31 elements at long sequence lengths
            b = tl.load(bias_base + q_idx.to(tl.int64) * stride_bt + k_idx * stride_bs,
                        mask=(q_idx < T) & (k_idx < S), other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634  # bias · log2(e)
        if HAS_KPM:  # key padding: one byte per key, nonzero = may be attended
            keep = tl.load(kpm_base + k_idx, mask=k_idx < S, other=0) != 0
            s = tl.where(keep, s, float("-inf"))
        if CHECK_N:  # the last key block sticks out past S
            s = tl.where(k_idx < S, s, float("-inf"))
        if CAUSAL_STEP:  # bottom-right causal: key j visible to query i iff j <= i + (S - T)
            s = tl.where(k_idx <= q_idx + causal_offset, s, float("-inf"))
        return s

    @triton.jit
    def _any(same):
        """Whether any element of a boolean tile is set: the tile has a query and a key of one
        segment, so it must be computed."""
        return tl.max(same.to(tl.int32)) > 0

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, offs_m, seg_q, k_base, v_base, bias_base, kpm_base, segk_base,
                    stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale, lo, hi,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL_STEP: tl.constexpr, EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, FP32_DOTS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
        """Online softmax over the key blocks [lo, hi) for one block of queries (the inner
        loop of FlashAttention-2's Algorithm 1): m, l and acc as in the module docstring.

        With segment ids (HAS_SEG), a tile in which no query shares a segment with any key
        is skipped before its loads: all its scores would be −inf, so it would add exactly
        nothing (p = 0, alpha = 1). In a row packed with n examples of similar length that is
        all but ~1/n of the causal tiles, plus the tiles that straddle a boundary; a skipped
        tile still costs BLOCK_N id loads and an (M, N) comparison, ~1/D of its matmul work.
        The same test skips tiles in the two backward loops."""
        offs_d = tl.arange(0, BLOCK_D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if HAS_SEG:
                seg_k = tl.load(segk_base + offs_n, mask=offs_n < S, other=-1)
                same = seg_q[:, None] == seg_k[None, :]  # (M, N)
                visit = _any(same)
            else:  # a constant: the loop stays free of branches
                same = offs_n
                visit = True
            if visit:
                k = _load_rows(k_base, offs_n, offs_d, stride_ks, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
                v = _load_rows(v_base, offs_n, offs_d, stride_vs, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
                if FP32_DOTS:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 units
                s = _scores(s, offs_m[:, None], offs_n[None, :], bias_base, kpm_base, same, stride_bt, stride_bs,
                            T, S, S - T, CAUSAL_STEP, not EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row that has seen only masked keys keeps m = −inf: shift by 0 there, not by
                # −inf (−inf − (−inf) would be NaN); its p and alpha are then exactly 0
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_shift[:, None])
                alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
                l_i = l_i * alpha + tl.sum(p, 1)
                # P goes into the PV product in the input dtype (tensor cores on a GPU); under the
                # interpreter the same rounding is applied, then the dot runs in fp32
                p_in = p.to(v_base.dtype.element_ty)
                if FP32_DOTS:
                    p_in = p_in.to(tl.float32)
                acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
                m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, BIAS, KPM, SEGQ, SEGK,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_ot,
                  stride_bb, stride_bh, stride_bt, stride_bs, stride_mb, stride_sqb, stride_skb,
                  H, T, S, GROUP, qk_scale, T_BUCKET, S_BUCKET,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                  FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head). Writes O and the base-2 LSE."""
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        # the blocks with the most keys to visit (last rows, causal) start first
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = (h // GROUP).to(tl.int64)  # the key/value head this query head reads
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh
        bias_base = BIAS + b64 * stride_bb + h64 * stride_bh
        kpm_base = KPM + b64 * stride_mb
        segk_base = SEGK + b64 * stride_skb
        seg_q = offs_m  # the queries' segment ids (HAS_SEG), loaded once
        if HAS_SEG:
            seg_q = tl.load(SEGQ + b64 * stride_sqb + offs_m, mask=offs_m < T, other=-1)

        q = _load_rows(q_base, offs_m, offs_d, stride_qt, T, HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)
        if FP32_DOTS:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            # keys >= start_m + BLOCK_M + (S - T) are masked for every row: never visited.
            # keys < n_full are visible to every row of the block: no causal mask there.
            n_end = tl.maximum(tl.minimum(S, start_m + BLOCK_M + S - T), 0)
            n_full = tl.maximum(start_m + 1 + S - T, 0) // BLOCK_N * BLOCK_N
            n_full = tl.minimum(n_full, n_end)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, offs_m, seg_q, k_base, v_base, bias_base, kpm_base,
                                        segk_base, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                                        0, n_full, HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_N,
                                        HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, offs_m, seg_q, k_base, v_base, bias_base, kpm_base,
                                        segk_base, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                                        n_full, n_end, HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_N,
                                        HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
        else:
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, offs_m, seg_q, k_base, v_base, bias_base, kpm_base,
                                        segk_base, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                                        0, S, HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_N,
                                        HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
        # rows that saw no key: l = 0 -> O = 0 and LSE = +inf, so that the backward's
        # P = 2^(S - LSE) is exactly 0 there
        dead = l_i == 0.0
        o = acc / tl.where(dead, 1.0, l_i)[:, None]
        lse = tl.where(dead, float("inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
        _store_rows(O + b64 * stride_ob + h64 * stride_oh, o, offs_m, offs_d, stride_ot, T, HEAD_DIM,
                    not EVEN_M, BLOCK_D != HEAD_DIM)
        lse_ptrs = LSE + bh.to(tl.int64) * T + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < T)

    @triton.jit
    def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh,
                             stride_dot, H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr):
        """D_i = rowsum(dO ∘ O)_i, in fp32 (the D of the backward equations)."""
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ot, T, HEAD_DIM, True, True)
        do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, T, HEAD_DIM, True, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, offs_n, seg_k, q_base, do_base, lse_base, delta_base, bias_base, kpm_base,
                     segq_base, stride_qt, stride_dot, stride_bt, stride_bs, T, S, qk_scale, lo, hi,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     CAUSAL_STEP: tl.constexpr, EVEN_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, FP32_DOTS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
        """Accumulate dV += Pᵀ dO and dK += dSᵀ Q (without the scale) over the query
        blocks [lo, hi). Works on the transposed tile Sᵀ (keys × queries), so that no
        operand needs a transpose for the two accumulating products. A tile with no query of
        these keys' segments is skipped (HAS_SEG, as in `_fwd_blocks`)."""
        offs_d = tl.arange(0, BLOCK_D)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if HAS_SEG:
                seg_q = tl.load(segq_base + offs_m, mask=offs_m < T, other=-1)
                same = seg_q[None, :] == seg_k[:, None]  # (N, M)
                visit = _any(same)
            else:  # a constant: the loop stays free of branches
                same = offs_m
                visit = True
            if visit:
                q = _load_rows(q_base, offs_m, offs_d, stride_qt, T, HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)
                do = _load_rows(do_base, offs_m, offs_d, stride_dot, T, HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)
                if EVEN_M:
                    lse = tl.load(lse_base + offs_m)
                    delta = tl.load(delta_base + offs_m)
                else:  # rows past T: LSE = +inf makes their P exactly 0
                    lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf"))
                    delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
                if FP32_DOTS:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (N, M)
                # keys past S need no mask here: they only touch rows of dK/dV that are not stored
                s_t = _scores(s_t, offs_m[None, :], offs_n[:, None], bias_base, kpm_base, same, stride_bt,
                              stride_bs, T, S, S - T, CAUSAL_STEP, False, HAS_BIAS, HAS_KPM, HAS_SEG)
                p_t = tl.exp2(s_t - lse[None, :])  # Pᵀ recomputed from the saved LSE
                p_in = p_t.to(do_base.dtype.element_ty)
                if FP32_DOTS:
                    p_in = p_in.to(tl.float32)
                dv = tl.dot(p_in, do, dv, input_precision=DOT_PRECISION)  # dV += Pᵀ dO
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dPᵀ = V dOᵀ
                ds_t = p_t * (dp_t - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ − D)
                ds_in = ds_t.to(q_base.dtype.element_ty)
                if FP32_DOTS:
                    ds_in = ds_in.to(tl.float32)
                dk = tl.dot(ds_in, q, dk, input_precision=DOT_PRECISION)  # dK += dSᵀ Q
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, KPM, SEGQ, SEGK,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dot,
                       stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                       stride_bb, stride_bh, stride_bt, stride_bs, stride_mb, stride_sqb, stride_skb,
                       H, H_KV, T, S, GROUP, qk_scale, sm_scale, T_BUCKET, S_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_M: tl.constexpr,
                       EVEN_N: tl.constexpr, FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_N keys of one (batch, key/value head); loops over the GROUP
        query heads that share it and over their query blocks, so dK and dV of the shared
        head are complete sums when stored (no atomics)."""
        bh = tl.program_id(0)
        b64 = (bh // H_KV).to(tl.int64)
        hk64 = (bh % H_KV).to(tl.int64)
        start_n = tl.program_id(1) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_rows(K + b64 * stride_kb + hk64 * stride_kh, offs_n, offs_d, stride_ks, S, HEAD_DIM,
                       not EVEN_N, BLOCK_D != HEAD_DIM)
        v = _load_rows(V + b64 * stride_vb + hk64 * stride_vh, offs_n, offs_d, stride_vs, S, HEAD_DIM,
                       not EVEN_N, BLOCK_D != HEAD_DIM)
        if FP32_DOTS:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        segq_base = SEGQ + b64 * stride_sqb
        seg_k = offs_n  # the keys' segment ids (HAS_SEG), loaded once
        if HAS_SEG:
            seg_k = tl.load(SEGK + b64 * stride_skb + offs_n, mask=offs_n < S, other=-1)
        if CAUSAL:
            # queries < start_n − (S − T) see none of these keys: skipped. Queries from m_full
            # on see all of them: no causal mask there.
            m_lo = tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M
            m_full = tl.maximum(start_n + BLOCK_N - 1 - (S - T), m_lo)
            m_full = tl.minimum((m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, (T + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
        for g in range(GROUP):
            h64 = hk64 * GROUP + g  # a query head reading this key/value head
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            lse_base = LSE + (b64 * H + h64) * T
            delta_base = DELTA + (b64 * H + h64) * T
            bias_base = BIAS + b64 * stride_bb + h64 * stride_bh
            kpm_base = KPM + b64 * stride_mb
            if CAUSAL:
                dk, dv = _dkdv_blocks(dk, dv, k, v, offs_n, seg_k, q_base, do_base, lse_base, delta_base,
                                      bias_base, kpm_base, segq_base, stride_qt, stride_dot, stride_bt, stride_bs,
                                      T, S, qk_scale, m_lo, m_full, HEAD_DIM, BLOCK_D, BLOCK_M, True, EVEN_M,
                                      HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
                dk, dv = _dkdv_blocks(dk, dv, k, v, offs_n, seg_k, q_base, do_base, lse_base, delta_base,
                                      bias_base, kpm_base, segq_base, stride_qt, stride_dot, stride_bt, stride_bs,
                                      T, S, qk_scale, m_full, T, HEAD_DIM, BLOCK_D, BLOCK_M, False, EVEN_M,
                                      HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
            else:
                dk, dv = _dkdv_blocks(dk, dv, k, v, offs_n, seg_k, q_base, do_base, lse_base, delta_base,
                                      bias_base, kpm_base, segq_base, stride_qt, stride_dot, stride_bt, stride_bs,
                                      T, S, qk_scale, 0, T, HEAD_DIM, BLOCK_D, BLOCK_M, False, EVEN_M,
                                      HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
        _store_rows(DK + b64 * stride_dkb + hk64 * stride_dkh, dk * sm_scale, offs_n, offs_d, stride_dks, S,
                    HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
        _store_rows(DV + b64 * stride_dvb + hk64 * stride_dvh, dv, offs_n, offs_d, stride_dvs, S,
                    HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)

    @triton.jit
    def _dq_blocks(dq, q, do, lse, delta, offs_m, seg_q, k_base, v_base, bias_base, kpm_base, segk_base, ds_base,
                   stride_ks, stride_vs, stride_bt, stride_bs, stride_dst, T, S, qk_scale, lo, hi,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL_STEP: tl.constexpr, EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, STORE_DS: tl.constexpr,
                   FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dQ += dS K (without the scale) over the key blocks [lo, hi); write dS
        itself when the bias needs its gradient. A tile with no key of these queries'
        segments is skipped (HAS_SEG, as in `_fwd_blocks`; its dS stays the buffer's 0)."""
        offs_d = tl.arange(0, BLOCK_D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if HAS_SEG:
                seg_k = tl.load(segk_base + offs_n, mask=offs_n < S, other=-1)
                same = seg_q[:, None] == seg_k[None, :]  # (M, N)
                visit = _any(same)
            else:  # a constant: the loop stays free of branches
                same = offs_n
                visit = True
            if visit:
                k = _load_rows(k_base, offs_n, offs_d, stride_ks, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
                v = _load_rows(v_base, offs_n, offs_d, stride_vs, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
                if FP32_DOTS:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N)
                s = _scores(s, offs_m[:, None], offs_n[None, :], bias_base, kpm_base, same, stride_bt, stride_bs,
                            T, S, S - T, CAUSAL_STEP, not EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG)
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dP = dO Vᵀ
                ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − D)
                if STORE_DS:
                    tl.store(ds_base + offs_m[:, None].to(tl.int64) * stride_dst + offs_n[None, :], ds,
                             mask=(offs_m[:, None] < T) & (offs_n[None, :] < S))
                ds_in = ds.to(k_base.dtype.element_ty)
                if FP32_DOTS:
                    ds_in = ds_in.to(tl.float32)
                dq = tl.dot(ds_in, k, dq, input_precision=DOT_PRECISION)  # dQ += dS K
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, BIAS, KPM, SEGQ, SEGK, DS,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dot,
                     stride_dqb, stride_dqh, stride_dqt,
                     stride_bb, stride_bh, stride_bt, stride_bs, stride_mb, stride_sqb, stride_skb,
                     H, T, S, GROUP, qk_scale, sm_scale, T_BUCKET, S_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, STORE_DS: tl.constexpr, EVEN_M: tl.constexpr,
                     EVEN_N: tl.constexpr, FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head); the same key-block loop
        bounds as the forward. DS (when STORE_DS) is a contiguous fp32 (B, H, T, S) buffer."""
        bh = tl.program_id(0)
        b64 = (bh // H).to(tl.int64)
        h64 = (bh % H).to(tl.int64)
        hk64 = h64 // GROUP
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qt, T, HEAD_DIM,
                       not EVEN_M, BLOCK_D != HEAD_DIM)
        do = _load_rows(DO + b64 * stride_dob + h64 * stride_doh, offs_m, offs_d, stride_dot, T, HEAD_DIM,
                        not EVEN_M, BLOCK_D != HEAD_DIM)
        lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
        if FP32_DOTS:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh
        bias_base = BIAS + b64 * stride_bb + h64 * stride_bh
        kpm_base = KPM + b64 * stride_mb
        segk_base = SEGK + b64 * stride_skb
        seg_q = offs_m  # the queries' segment ids (HAS_SEG), loaded once
        if HAS_SEG:
            seg_q = tl.load(SEGQ + b64 * stride_sqb + offs_m, mask=offs_m < T, other=-1)
        ds_base = DS + bh.to(tl.int64) * T * S
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            n_end = tl.maximum(tl.minimum(S, start_m + BLOCK_M + S - T), 0)
            n_full = tl.minimum(tl.maximum(start_m + 1 + S - T, 0) // BLOCK_N * BLOCK_N, n_end)
            dq = _dq_blocks(dq, q, do, lse, delta, offs_m, seg_q, k_base, v_base, bias_base, kpm_base, segk_base,
                            ds_base, stride_ks, stride_vs, stride_bt, stride_bs, S, T, S, qk_scale, 0, n_full,
                            HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG, STORE_DS,
                            FP32_DOTS, DOT_PRECISION)
            dq = _dq_blocks(dq, q, do, lse, delta, offs_m, seg_q, k_base, v_base, bias_base, kpm_base, segk_base,
                            ds_base, stride_ks, stride_vs, stride_bt, stride_bs, S, T, S, qk_scale, n_full, n_end,
                            HEAD_DIM, BLOCK_D, BLOCK_N, True, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG, STORE_DS,
                            FP32_DOTS, DOT_PRECISION)
        else:
            dq = _dq_blocks(dq, q, do, lse, delta, offs_m, seg_q, k_base, v_base, bias_base, kpm_base, segk_base,
                            ds_base, stride_ks, stride_vs, stride_bt, stride_bs, S, T, S, qk_scale, 0, S,
                            HEAD_DIM, BLOCK_D, BLOCK_N, False, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG, STORE_DS,
                            FP32_DOTS, DOT_PRECISION)
        _store_rows(DQ + b64 * stride_dqb + h64 * stride_dqh, dq * sm_scale, offs_m, offs_d, stride_dqt, T,
                    HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)

    # --- launch configurations ------------------------------------------------------------
    # EVEN_M / EVEN_N: the sequence lengths are multiples of the block, so no tile sticks
    # out and the loads need no row masks (the common training case, T = S = 2^k).
    _EVEN = {"EVEN_M": lambda a: a["T"] % a["BLOCK_M"] == 0, "EVEN_N": lambda a: a["S"] % a["BLOCK_N"] == 0}

    # GPU candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) by head-dim class (BLOCK_D up
    # to 64, 128, 256), each compiled for sm_90 and checked to spill no registers and to fit
    # Hopper's shared memory. Autotuned once per head dim, flags, dtype and power-of-two
    # bucket of the sequence lengths. The forward and dQ keep a tall query block (its fp32
    # accumulator in registers, K/V streaming through shared memory); dK/dV keeps two fp32
    # (BLOCK_N, D) accumulators, so its key block shrinks as D grows.
    _GPU_BLOCKS = {
        "fwd": {64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
                128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
                256: [(64, 64, 8, 2), (64, 32, 4, 2)]},
        "dkdv": {64: [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 2)],
                 128: [(32, 128, 8, 2), (32, 64, 8, 3), (32, 32, 4, 3)],
                 256: [(32, 32, 8, 2), (16, 32, 8, 2)]},
        "dq": {64: [(128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
               128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2)],
               256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2)]},
    }
    # fp32 inputs: IEEE fp32 dots run on the FMA units, not the tensor cores, and large tiles
    # only make the unrolled code slow to compile: one modest tile, no tuning (fp32 is the
    # exact path, bf16/fp16 the fast one)
    _FP32_BLOCKS = {64: (32, 32, 4, 2), 128: (32, 32, 4, 2), 256: (32, 32, 4, 1)}

    def _gpu_configs(kernel: str, block_d: int | None = None, fp32: bool = False):
        """The candidates of one kernel for one head-dim class and dtype; with no block_d,
        all of them (the autotuner's list, pruned at each launch by `_pruner`)."""
        if block_d is None:
            blocks = [b for bs in _GPU_BLOCKS[kernel].values() for b in bs] + list(_FP32_BLOCKS.values())
        else:
            d_class = min(d for d in (64, 128, 256) if d >= block_d)
            blocks = [_FP32_BLOCKS[d_class]] if fp32 else _GPU_BLOCKS[kernel][d_class]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in dict.fromkeys(blocks)]

    def _pruner(kernel: str):
        def prune(configs, named_args, **kwargs):
            keep = {str(c) for c in _gpu_configs(kernel, kwargs["BLOCK_D"], kwargs["DOT_PRECISION"] == "ieee")}
            return [c for c in configs if str(c) in keep]
        return {"early_config_prune": prune}

    _KEY = ["HEAD_DIM", "CAUSAL", "HAS_BIAS", "HAS_KPM", "HAS_SEG", "T_BUCKET", "S_BUCKET"]

    _attn_fwd_h = triton.heuristics(_EVEN)(_attn_fwd)
    _attn_bwd_dkdv_h = triton.heuristics(_EVEN)(_attn_bwd_dkdv)
    _attn_bwd_dq_h = triton.heuristics(_EVEN)(_attn_bwd_dq)
    _attn_fwd_tuned = triton.autotune(_gpu_configs("fwd"), key=_KEY, prune_configs_by=_pruner("fwd"))(_attn_fwd_h)
    _attn_bwd_dkdv_tuned = triton.autotune(_gpu_configs("dkdv"), key=_KEY,
                                           prune_configs_by=_pruner("dkdv"))(_attn_bwd_dkdv_h)
    _attn_bwd_dq_tuned = triton.autotune(_gpu_configs("dq"), key=_KEY + ["STORE_DS"],
                                         prune_configs_by=_pruner("dq"))(_attn_bwd_dq_h)


def _segment_pair(segment_ids, segment_ids_k):
    """(seg_q (B, T), seg_k (B, S)), or None without segments: the keys share the queries'
    ids unless segment_ids_k says otherwise."""
    if segment_ids is None:
        return None
    return segment_ids, segment_ids if segment_ids_k is None else segment_ids_k


def _allowed_keys(T: int, S: int, causal: bool, key_padding_mask: torch.Tensor | None,
                  device: torch.device, segments=None) -> torch.Tensor | None:
    """Boolean mask, True where query i may attend key j, broadcastable to (B, 1, T, S);
    None when everything is allowed. Causal is bottom-right aligned: j <= i + (S - T).
    segments: (seg_q, seg_k) or None; keys of another segment are masked."""
    allowed = None
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allowed = j <= i + (S - T)  # (T, S)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        allowed = pad if allowed is None else allowed & pad
    if segments is not None:
        seg_q, seg_k = segments
        same = seg_q[:, None, :, None] == seg_k[:, None, None, :]  # (B, 1, T, S)
        allowed = same if allowed is None else allowed & same
    return allowed


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, bias=None,
                        segment_ids=None, segment_ids_k=None):
    """Plain PyTorch attention, matmul → softmax → matmul, in the inputs' dtype (the tests
    run it in float64 as the ground truth). Same conventions as `attention`: bottom-right
    causal mask, document mask from segment ids, GQA by repeating each key/value head, rows
    with no key to attend → 0."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if H != H_kv:
        k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(H // H_kv, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if bias is not None:
        s = s + bias
    allowed = _allowed_keys(T, S, causal, key_padding_mask, q.device, _segment_pair(segment_ids, segment_ids_k))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)  # (B, H, T, 1): no key to attend
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v  # (B, H, T, D)


def _validate(q, k, v, key_padding_mask, bias, softmax_scale, dtypes, segment_ids=None, segment_ids_k=None) -> float:
    """Check the arguments; return the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, dtypes)
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims ({'B, H, T, D' if name == 'q' else 'B, H_kv, S, D'}), "
                             f"got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} has a zero-size dimension: shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask, bias=bias, segment_ids=segment_ids,
                      segment_ids_k=segment_ids_k)
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size {k.shape[0]} differs from q's {B}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim {k.shape[3]} differs from q's {D}")
    H_kv, S = k.shape[1], k.shape[2]
    if H % H_kv != 0:
        raise ValueError(f"q's head count H={H} must be a multiple of k/v's H_kv={H_kv} (grouped-query attention)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is not supported: at most {MAX_HEAD_DIM}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True where a key may be attended), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got {tuple(key_padding_mask.shape)}")
    if bias is not None:
        check_float("bias", bias, dtypes)
        try:
            ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, (B, H, T, S)) == (B, H, T, S)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (B, H, T, S) = {(B, H, T, S)}")
    _validate_segments(segment_ids, segment_ids_k, B, T, S)
    if softmax_scale is None:
        return D ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def _validate_segments(segment_ids, segment_ids_k, B: int, T: int, S: int) -> None:
    if segment_ids is None:
        if segment_ids_k is not None:
            raise ValueError("segment_ids_k was given without segment_ids: pass the queries' ids as well")
        return
    for name, t, dims, n in (("segment_ids", segment_ids, "B, T", T), ("segment_ids_k", segment_ids_k, "B, S", S)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor (equal ids = one segment), got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (B, n):
            raise ValueError(f"{name} must have shape ({dims}) = {(B, n)}, got {tuple(t.shape)}")
    if segment_ids_k is None and T != S:
        raise ValueError(f"segment_ids holds the ids of the T={T} queries; with S={S} keys pass segment_ids_k "
                         f"of shape {(B, S)} too")


def _attention_torch(q, k, v, causal, scale, key_padding_mask, bias, segments=None):
    """The `torch` backend: PyTorch's fused scaled_dot_product_attention, with the masks
    folded into one attn_mask and rows with no key to attend set to exactly 0 (SDPA alone
    returns NaN or a uniform average there)."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    gqa = {}
    if H != H_kv:
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}  # SDPA reads head h // (H / H_kv) itself
        else:
            k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // H_kv, dim=1)
    if bias is None and key_padding_mask is None and segments is None and (not causal or T == S):  # no empty row
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    allowed = _allowed_keys(T, S, causal, key_padding_mask, q.device, segments)
    if bias is None:
        mask = allowed
        dead = ~allowed.any(dim=-1, keepdim=True)
        live_mask = mask | dead  # a dead row attends everything (finite), then is zeroed below
    else:
        mask = bias.to(q.dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
        if bool(torch.isneginf(bias).any()):  # the bias itself may empty a row: scan the full mask
            dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
        else:  # a finite bias (T5's relative positions) empties no row: only the masks can
            dead = None if allowed is None else ~allowed.any(dim=-1, keepdim=True)
        live_mask = mask if dead is None else mask.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=live_mask, scale=scale, **gqa)
    # zero, not multiply: the gradient reaching the dead rows is then exactly 0, so are their dS
    return out.masked_fill(dead, 0.0) if dead is not None and bool(dead.any()) else out


def _poison() -> bool:
    return interpreter_on() if POISON_OUTPUTS is None else POISON_OUTPUTS


def _new(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except along the head dim, which must be 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _LaunchArgs:
    """What every kernel launch shares: the flags, the bias and mask pointers/strides, the
    block config (fixed under the interpreter, autotuned on a GPU)."""

    def __init__(self, q, k, bias, key_padding_mask, causal, scale, segments=None):
        B, H, T, D = q.shape
        self.B, self.H, self.T, self.D = B, H, T, D
        self.H_kv, self.S = k.shape[1], k.shape[2]
        self.group = H // self.H_kv
        self.scale = scale
        self.qk_scale = scale * LOG2E
        self.bias = q if bias is None else bias.expand(B, H, T, self.S)  # stride 0 on broadcast dims
        self.bias_strides = (0, 0, 0, 0) if bias is None else self.bias.stride()
        self.kpm = q if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
        self.kpm_stride = 0 if key_padding_mask is None else self.kpm.stride(0)
        seg_q, seg_k = (q, q) if segments is None else (s.contiguous() for s in segments)
        self.seg = (seg_q, seg_k)  # (B, T) and (B, S) ids, read with unit stride along the sequence
        self.seg_strides = (0, 0) if segments is None else (seg_q.stride(0), seg_k.stride(0))
        self.interp = interpreter_on()
        self.meta = dict(
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=bool(causal),
            HAS_BIAS=bias is not None, HAS_KPM=key_padding_mask is not None, HAS_SEG=segments is not None,
            FP32_DOTS=self.interp, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the default
        )
        # autotune key: the sequence lengths rounded up to a power of two, so that a new
        # length (generation, a ragged batch) does not re-run the tuning each time
        self.buckets = (triton.next_power_of_2(T), triton.next_power_of_2(self.S))

    def launch(self, which, tuned, plain, rows, n_programs_0, *args, **extra):
        """rows: 'T' or 'S', the length the grid's second axis tiles."""
        n = self.T if rows == "T" else self.S
        if self.interp:
            bm, bn = INTERPRETER_BLOCKS[which]
            block = bm if rows == "T" else bn
            plain[(n_programs_0, triton.cdiv(n, block))](*args, *self.buckets, BLOCK_M=bm, BLOCK_N=bn,
                                                           **self.meta, **extra)
        else:
            key = "BLOCK_M" if rows == "T" else "BLOCK_N"
            tuned[lambda m: (n_programs_0, triton.cdiv(n, m[key]))](*args, *self.buckets, **self.meta, **extra)


def _forward_triton(q, k, v, a: _LaunchArgs):
    B, H, T, D, S = a.B, a.H, a.T, a.D, a.S
    o = _new((B, H, T, D), q)
    lse = _new((B, H, T), q, torch.float32)
    a.launch("fwd", _attn_fwd_tuned, _attn_fwd_h, "T", B * H,
             q, k, v, o, lse, a.bias, a.kpm, *a.seg, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
             *o.stride()[:3], *a.bias_strides, a.kpm_stride, *a.seg_strides, H, T, S, a.group, a.qk_scale)
    return o, lse


def _backward_triton(q, k, v, o, lse, do, a: _LaunchArgs, need_dq, need_dkdv, need_dbias):
    B, H, T, D, S, H_kv = a.B, a.H, a.T, a.D, a.S, a.H_kv
    do = _last_dim_unit(do)
    delta = _new((B, H, T), q, torch.float32)
    block_d = a.meta["BLOCK_D"]
    _attn_bwd_preprocess[(B * H, triton.cdiv(T, 64))](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                                      HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=64)
    dq = dk = dv = ds = None
    if need_dkdv:
        dk, dv = _new(k.shape, k), _new(v.shape, v)
        a.launch("dkdv", _attn_bwd_dkdv_tuned, _attn_bwd_dkdv_h, "S", B * H_kv,
                 q, k, v, do, lse, delta, dk, dv, a.bias, a.kpm, *a.seg, *q.stride()[:3], *k.stride()[:3],
                 *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *a.bias_strides,
                 a.kpm_stride, *a.seg_strides, H, H_kv, T, S, a.group, a.qk_scale, a.scale)
    if need_dq or need_dbias:
        dq = _new(q.shape, q)
        # dS for the bias gradient: zeros, since the causal loop never visits the blocks
        # where dS is 0 anyway; fp32, (B, H, T, S) — the one O(T·S) buffer, only when asked
        ds = torch.zeros((B, H, T, S), dtype=torch.float32, device=q.device) if need_dbias else delta
        a.launch("dq", _attn_bwd_dq_tuned, _attn_bwd_dq_h, "T", B * H,
                 q, k, v, do, lse, delta, dq, a.bias, a.kpm, *a.seg, ds, *q.stride()[:3], *k.stride()[:3],
                 *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *a.bias_strides, a.kpm_stride,
                 *a.seg_strides, H, T, S, a.group, a.qk_scale, a.scale, STORE_DS=need_dbias)
    return dq, dk, dv, (ds if need_dbias else None)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, seg_q, seg_k, causal, scale):
        q, k, v = _last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v)
        segments = None if seg_q is None else (seg_q, seg_k)
        a = _LaunchArgs(q, k, bias, key_padding_mask, causal, scale, segments)
        o, lse = _forward_triton(q, k, v, a)
        ctx.save_for_backward(q, k, v, o, lse, bias, key_padding_mask, seg_q, seg_k)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so instead of a wrong answer
    def backward(ctx, do):
        q, k, v, o, lse, bias, key_padding_mask, seg_q, seg_k = ctx.saved_tensors
        segments = None if seg_q is None else (seg_q, seg_k)
        a = _LaunchArgs(q, k, bias, key_padding_mask, ctx.causal, ctx.scale, segments)
        need = ctx.needs_input_grad
        dq, dk, dv, ds = _backward_triton(q, k, v, o, lse, do, a, need[0], need[1] or need[2], need[3])
        dbias = ds.sum_to_size(bias.shape).to(bias.dtype) if ds is not None else None
        return dq, dk, dv, dbias, None, None, None, None, None


def attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, bias=None,
              segment_ids=None, segment_ids_k=None, backend="auto"):
    """softmax(scale · q kᵀ + bias + mask) v, differentiable in q, k, v and bias.

    q (B, H, T, D); k, v (B, H_kv, S, D) with H % H_kv == 0 (GQA / MQA when H_kv < H);
    returns (B, H, T, D) in q's dtype.

    causal            bottom-right aligned (FlashAttention ≥ 2.1): query i attends key j iff
                      j <= i + (S − T); the usual mask when T == S. For causal
                      self-attention in a model: attention(q, k, v, causal=True).
    softmax_scale     default 1 / sqrt(D).
    key_padding_mask  bool (B, S), True where a key may be attended.
    bias              additive, broadcastable to (B, H, T, S) (e.g. (1, H, T, S) relative
                      position bias, (B, 1, 1, S)); gets a gradient if it requires one (the
                      triton backend then stores dS in a (B, H, T, S) fp32 buffer).
    segment_ids       int32/int64 (B, T): document masking for packed sequences; query i
                      attends key j only if their ids are equal (and causality allows). The
                      keys carry the same ids (so T must equal S) unless
    segment_ids_k     int32/int64 (B, S) gives the keys' own ids (e.g. a cache of keys).
                      Any id values work (padding may take one of its own, e.g. -1), and ids
                      need not form contiguous runs; packed rows do, and then most tiles hold
                      no query-key pair of one segment, which the triton kernels skip.
    backend           "auto" (triton on CUDA, torch elsewhere), "torch" (PyTorch's SDPA; also
                      float64), "triton" (our kernels; fp16, bf16, fp32).

    Query rows with no key to attend (all masked) give 0 and zero gradients, never NaN.
    Inputs may have any strides as long as the head dim is contiguous (else it is copied);
    head dims 1..256 (padded to a power of two ≥ 16 inside the kernel). fp32 inputs run
    fp32 math (no TF32). No attention dropout.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    be = resolve_backend(backend, q)
    dtypes = _TORCH_DTYPES if be == "torch" else _TRITON_DTYPES
    scale = _validate(q, k, v, key_padding_mask, bias, softmax_scale, dtypes, segment_ids, segment_ids_k)
    segments = _segment_pair(segment_ids, segment_ids_k)
    if be == "torch":
        return _attention_torch(q, k, v, bool(causal), scale, key_padding_mask, bias, segments)
    seg_q, seg_k = (None, None) if segments is None else segments
    return _FlashAttention.apply(q, k, v, bias, key_padding_mask, seg_q, seg_k, bool(causal), scale)


def _causal_fraction(T: int, S: int) -> float:
    """Share of the T×S score matrix a bottom-right causal mask keeps: 1/2 when T == S (the
    convention of FlashAttention's benchmarks), the exact count otherwise."""
    if T == S:
        return 0.5
    # row i sees min(S, max(0, i + S − T + 1)) keys
    visible = T * (S - T + 1) + T * (T - 1) / 2 if T < S else S * (S + 1) / 2
    return visible / (T * S)


_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def flops(B: int, H: int, T: int, S: int, D: int, *, causal: bool = False, mode: str = "fwd") -> float:
    """Matmul FLOPs: forward 4·B·H·T·S·D (QKᵀ and PV, 2 FLOPs per multiply-add); backward
    2.5× the forward (FlashAttention-2's convention: dV, dP, dQ, dK plus the recomputation of
    S); fwd+bwd 3.5×. Causal counts only the visible part (half when T == S)."""
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_MODE_FACTOR)}, got {mode!r}")
    f = 4.0 * B * H * T * S * D * _MODE_FACTOR[mode]
    return f * _causal_fraction(T, S) if causal else f


def bytes_moved(B: int, H: int, H_kv: int, T: int, S: int, D: int, *, dtype_bytes: int = 2,
                mode: str = "fwd") -> float:
    """The HBM traffic the fused kernels need at least (each tensor read or written once):
    forward reads Q, K, V and writes O and the fp32 LSE; backward reads Q, K, V, O, dO and
    the LSE, writes and reads D = rowsum(dO ∘ O) (fp32), writes dQ, dK, dV."""
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_MODE_FACTOR)}, got {mode!r}")
    q = B * H * T * D * dtype_bytes  # Q, O, dO, dQ each
    kv = B * H_kv * S * D * dtype_bytes  # K, V, dK, dV each
    row = B * H * T * 4  # LSE, D each (fp32)
    fwd = 2 * q + 2 * kv + row  # Q, K, V in; O, LSE out
    bwd = 4 * q + 4 * kv + 3 * row  # Q, O, dO in, dQ out; K, V in, dK, dV out; LSE in, D out + in
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])
