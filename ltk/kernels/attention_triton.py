"""Triton kernels for fused attention (ltk/kernels/attention.py holds the math, the references,
the autograd function, the argument checks, the launch code and the cost model).

Kernels (FlashAttention-2, Dao 2023, arXiv 2307.08691, Algorithms 1 and 2):
  * `_attn_fwd`: one program per (query block, head, batch); online softmax over the key
    blocks; writes O and the base-2 LSE.
  * `_attn_bwd_preprocess`: D_i = rowsum(dO ∘ O)_i.
  * `_attn_bwd_dkdv`: one program per (key block, key/value head, batch); loops over the
    query heads that share the key/value head and over their query blocks.
  * `_attn_bwd_dq`: one program per (query block, head, batch); the forward's key loop.
No two programs write the same output: no atomics, deterministic results.

What the code does for speed, and why:
  * Grid order. The block index is the grid's fast axis (axis 0), the head and the batch the
    slow ones (1, 2), as FA2 and the Triton tutorial: programs launched together are the
    query blocks of one head, which stream the same K and V, so those come from L2 once
    instead of once per program.
  * Scale folded into the max-subtract. In a tile with no mask the row max is taken on the
    raw scores q·k and scaled once per row; then p = exp2(q·k · scale·log2e − m) is one FFMA
    and one MUFU.EX2 per score (the Triton tutorial's form). This needs scale ≥ 0, which the
    launcher guarantees (a negative scale is run as −scale with k negated). Masked tiles
    (causal diagonal, padding, bias, segments, ragged ends) scale first and mask after, so a
    masked −inf never meets a zero scale.
  * Segment ids bound the loops instead of guarding the loads. The launcher computes, per
    query, the range [lo, hi) of keys that may share its segment (and per key the range of
    queries); a program reduces these over its block to its loop bounds. The loops then
    hold no data-dependent branch, so the compiler's software pipeline (cp.async prefetch
    of the next K/V tiles on sm_80/sm_90) stays in place.
  * Addresses in two parts. A tile's first row is addressed in int64 (`start · stride`
    passes 2³¹ once T·H·D does, e.g. a (B, T, H, D) tensor viewed as (B, H, T, D)); the
    offsets inside the tile, `row · stride + col` for row < BLOCK, stay int32 and do not
    change from one tile to the next. The same holds for the bias tile.

Tensor descriptors (TMA) are not used: the kernels take any strides with a unit last dim and
any head dim 1..256, while a TMA descriptor needs 16-byte aligned strides and base, so a
second load path (and its tests) would be needed for the general case; the address
arithmetic it would save is measured instead (see the docstring of `_GPU_BLOCKS`).

Under the interpreter every dot runs on fp32 values (FP32_DOTS; bf16 arithmetic is not right
there): loads are cast to fp32 after the load, P and dS are rounded to the input dtype
first, and stores cast to the output's dtype.
"""
from __future__ import annotations

from ltk.kernels.backend import HAS_TRITON, device_arch

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_rows(base, start, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr,
                   CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
        """Rows start + rows (rows = 0..BLOCK−1) of an (n_rows, HEAD_DIM) matrix whose last dim
        has stride 1: the tile's first row in int64, the offsets inside it in int32; masks
        only where a constexpr says the tile may stick out (zeros there)."""
        ptrs = base + tl.cast(start, tl.int64) * stride_row + (rows[:, None] * stride_row + cols[None, :])
        if CHECK_ROWS and CHECK_COLS:
            x = tl.load(ptrs, mask=(start + rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        elif CHECK_ROWS:
            x = tl.load(ptrs, mask=start + rows[:, None] < n_rows, other=0.0)
        elif CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _store_rows(base, x, start, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr,
                    CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
        ptrs = base + tl.cast(start, tl.int64) * stride_row + (rows[:, None] * stride_row + cols[None, :])
        x = x.to(base.dtype.element_ty)
        if CHECK_ROWS and CHECK_COLS:
            tl.store(ptrs, x, mask=(start + rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))
        elif CHECK_ROWS:
            tl.store(ptrs, x, mask=start + rows[:, None] < n_rows)
        elif CHECK_COLS:
            tl.store(ptrs, x, mask=cols[None, :] < HEAD_DIM)
        else:
            tl.store(ptrs, x)

    @triton.jit
    def _load_bias(base, q_start, k_start, q_loc, k_loc, stride_bt, stride_bs, T, S,
                   CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr):
        """The bias tile of queries q_start + q_loc and keys k_start + k_loc, in the layout of
        q_loc / k_loc ((M,1)/(1,N) for an S tile, (1,M)/(N,1) for Sᵀ), as fp32. The tile's
        corner in int64 (a (T, S) plane can pass 2³¹ elements), the rest int32."""
        corner = base + tl.cast(q_start, tl.int64) * stride_bt + tl.cast(k_start, tl.int64) * stride_bs
        ptrs = corner + (q_loc * stride_bt + k_loc * stride_bs)
        if CHECK_Q and CHECK_K:
            b = tl.load(ptrs, mask=(q_start + q_loc < T) & (k_start + k_loc < S), other=0.0)
        elif CHECK_Q:
            b = tl.load(ptrs, mask=q_start + q_loc < T, other=0.0)
        elif CHECK_K:
            b = tl.load(ptrs, mask=k_start + k_loc < S, other=0.0)
        else:
            b = tl.load(ptrs)
        return b.to(tl.float32)

    @triton.jit
    def _scores(s, q_idx, k_idx, b, keep, same, S, causal_offset, CAUSAL_STEP: tl.constexpr,
                CHECK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr):
        """Finish a tile of scores in log2 units: s = (scale·q·k)·log2e on entry; adds the bias
        tile b ·log2e and sets −inf where the key may not be attended: keep (key padding,
        nonzero = may attend), same (seg_q[i] == seg_k[j]), keys past S, causality. q_idx /
        k_idx are the query / key indices broadcast to the tile's layout, so the same code
        serves S and Sᵀ tiles."""
        if HAS_SEG:  # document masking: a key of another segment is never attended
            s = tl.where(same, s, float("-inf"))
        if HAS_BIAS:
            s += b * 1.4426950408889634  # bias · log2(e)
        if HAS_KPM:
            s = tl.where(keep, s, float("-inf"))
        if CHECK_N:  # the last key block sticks out past S
            s = tl.where(k_idx < S, s, float("-inf"))
        if CAUSAL_STEP:  # bottom-right causal: key j visible to query i iff j <= i + (S - T)
            s = tl.where(k_idx <= q_idx + causal_offset, s, float("-inf"))
        return s

    @triton.jit
    def _segment_range(ranges, offs, n, n_other, BLOCK: tl.constexpr):
        """Loop bounds [lo, hi) over the other side for a block of `offs` (< n): the union of
        the per-row ranges in `ranges` (lo at ranges[i], hi at ranges[n + i]), lo rounded down
        to a multiple of BLOCK so that the tiles stay aligned (EVEN_* and the causal split
        assume it). A row with no partner has lo = n_other, hi = 0: nothing to visit."""
        lo = tl.min(tl.load(ranges + offs, mask=offs < n, other=n_other), 0)
        hi = tl.max(tl.load(ranges + n + offs, mask=offs < n, other=0), 0)
        return lo // BLOCK * BLOCK, hi

    @triton.jit
    def _fwd_blocks(acc, l_i, m_i, q, start_m, seg_q, k_base, v_base, bias_row, kpm_base, segk_base,
                    stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale, lo, hi,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL_STEP: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
                    FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Online softmax over the key blocks [lo, hi) for one block of queries (the inner
        loop of FlashAttention-2's Algorithm 1): m, l and acc as in attention.py's docstring.
        A tile with no mask takes the row max of the raw scores and subtracts in one FFMA."""
        cols = tl.arange(0, BLOCK_D)
        rows_m = tl.arange(0, BLOCK_M)
        rows_n = tl.arange(0, BLOCK_N)
        offs_m = start_m + rows_m
        for start_n in range(lo, hi, BLOCK_N):
            k = _load_rows(k_base, start_n, rows_n, cols, stride_ks, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
            v = _load_rows(v_base, start_n, rows_n, cols, stride_vs, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
            if FP32_DOTS:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N), raw q·k
            if CAUSAL_STEP or HAS_BIAS or HAS_KPM or HAS_SEG or not EVEN_N:
                offs_n = start_n + rows_n
                b = qk
                keep = qk
                same = qk
                if HAS_BIAS:
                    b = _load_bias(bias_row, start_m, start_n, rows_m[:, None], rows_n[None, :], stride_bt,
                                   stride_bs, T, S, not EVEN_M, not EVEN_N)
                if HAS_KPM:  # one byte per key, nonzero = may be attended
                    keep = (tl.load(kpm_base + offs_n, mask=offs_n < S, other=0) != 0)[None, :]
                if HAS_SEG:
                    seg_k = tl.load(segk_base + offs_n, mask=offs_n < S, other=-1)
                    same = seg_q[:, None] == seg_k[None, :]  # (M, N)
                s = _scores(qk * qk_scale, offs_m[:, None], offs_n[None, :], b, keep, same, S, S - T,
                            CAUSAL_STEP, not EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row that has seen only masked keys keeps m = −inf: shift by 0 there, not by
                # −inf (−inf − (−inf) would be NaN); its p and alpha are then exactly 0
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_shift[:, None])
                alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
            else:  # every score is finite: max(scale·x) = scale·max(x) for scale >= 0
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.exp2(qk * qk_scale - m_new[:, None])  # one FFMA a score
                alpha = tl.exp2(m_i - m_new)
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
    def _attn_fwd(Q, K, V, O, LSE, BIAS, KPM, SEGQ, SEGK, SEGR,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_ot,
                  stride_bb, stride_bh, stride_bt, stride_bs,
                  H, T, S, GROUP, qk_scale, T_BUCKET, S_BUCKET,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                  FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head). Writes O and the base-2 LSE.
        KPM (B, S) bytes, SEGQ (B, T), SEGK (B, S) ids and SEGR (B, 2, T) key ranges are
        contiguous."""
        # the blocks with the most keys to visit (last rows, causal) start first
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        h = tl.program_id(1)
        b64 = tl.program_id(2).to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = (h // GROUP).to(tl.int64)  # the key/value head this query head reads
        rows_m = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows_m
        cols = tl.arange(0, BLOCK_D)
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh
        bias_row = BIAS + b64 * stride_bb + h64 * stride_bh
        kpm_base = KPM + b64 * S
        segk_base = SEGK + b64 * S
        seg_q = offs_m  # the queries' segment ids (HAS_SEG), loaded once
        lo = 0
        hi = S
        if HAS_SEG:
            seg_q = tl.load(SEGQ + b64 * T + offs_m, mask=offs_m < T, other=-1)
            lo, hi = _segment_range(SEGR + b64 * 2 * T, offs_m, T, S, BLOCK_N)

        q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, start_m, rows_m, cols, stride_qt, T, HEAD_DIM,
                       not EVEN_M, BLOCK_D != HEAD_DIM)
        if FP32_DOTS:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            # keys >= start_m + BLOCK_M + (S - T) are masked for every row: never visited.
            # keys < n_full are visible to every row of the block: no causal mask there.
            n_end = tl.minimum(tl.maximum(tl.minimum(S, start_m + BLOCK_M + S - T), 0), hi)
            n_full = tl.minimum(tl.maximum(start_m + 1 + S - T, 0) // BLOCK_N * BLOCK_N, n_end)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, start_m, seg_q, k_base, v_base, bias_row, kpm_base,
                                        segk_base, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                                        lo, n_full, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, EVEN_M, EVEN_N,
                                        HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, start_m, seg_q, k_base, v_base, bias_row, kpm_base,
                                        segk_base, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                                        tl.maximum(n_full, lo), n_end, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True,
                                        EVEN_M, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
        else:
            acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, start_m, seg_q, k_base, v_base, bias_row, kpm_base,
                                        segk_base, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                                        lo, hi, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, EVEN_M, EVEN_N,
                                        HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
        # rows that saw no key: l = 0 -> O = 0 and LSE = +inf, so that the backward's
        # P = 2^(S - LSE) is exactly 0 there
        dead = l_i == 0.0
        o = acc / tl.where(dead, 1.0, l_i)[:, None]
        lse = tl.where(dead, float("inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
        _store_rows(O + b64 * stride_ob + h64 * stride_oh, o, start_m, rows_m, cols, stride_ot, T, HEAD_DIM,
                    not EVEN_M, BLOCK_D != HEAD_DIM)
        lse_ptrs = LSE + (b64 * H + h64) * T + offs_m
        if EVEN_M:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < T)

    @triton.jit
    def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh,
                             stride_dot, H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr):
        """D_i = rowsum(dO ∘ O)_i, in fp32 (the D of the backward equations)."""
        start_m = tl.program_id(0) * BLOCK_M
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        o = _load_rows(O + b * stride_ob + h * stride_oh, start_m, rows, cols, stride_ot, T, HEAD_DIM, True, True)
        do = _load_rows(DO + b * stride_dob + h * stride_doh, start_m, rows, cols, stride_dot, T, HEAD_DIM,
                        True, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + (b * H + h) * T + start_m + rows, delta, mask=start_m + rows < T)

    @triton.jit
    def _dkdv_blocks(dk, dv, k, v, start_n, seg_k, keep, q_base, do_base, lse_base, delta_base, bias_row,
                     segq_base, stride_qt, stride_dot, stride_bt, stride_bs, T, S, qk_scale, lo, hi,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL_STEP: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
                     FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dV += Pᵀ dO and dK += dSᵀ Q (without the scale) over the query blocks
        [lo, hi). Works on the transposed tile Sᵀ (keys × queries), so that no operand needs
        a transpose for the two accumulating products. keep: the keys' padding flags (N, 1)."""
        cols = tl.arange(0, BLOCK_D)
        rows_m = tl.arange(0, BLOCK_M)
        rows_n = tl.arange(0, BLOCK_N)
        offs_n = start_n + rows_n
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + rows_m
            q = _load_rows(q_base, start_m, rows_m, cols, stride_qt, T, HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)
            do = _load_rows(do_base, start_m, rows_m, cols, stride_dot, T, HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)
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
            b = s_t
            same = s_t
            if HAS_BIAS:
                b = _load_bias(bias_row, start_m, start_n, rows_m[None, :], rows_n[:, None], stride_bt, stride_bs,
                               T, S, not EVEN_M, not EVEN_N)
            if HAS_SEG:
                seg_q = tl.load(segq_base + offs_m, mask=offs_m < T, other=-1)
                same = seg_q[None, :] == seg_k[:, None]  # (N, M)
            # keys past S need no mask here: they only touch rows of dK/dV that are not stored
            s_t = _scores(s_t, offs_m[None, :], offs_n[:, None], b, keep, same, S, S - T, CAUSAL_STEP, False,
                          HAS_BIAS, HAS_KPM, HAS_SEG)
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
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, KPM, SEGQ, SEGK, SEGR,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dot,
                       stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                       stride_bb, stride_bh, stride_bt, stride_bs,
                       H, T, S, GROUP, qk_scale, sm_scale, T_BUCKET, S_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, EVEN_M: tl.constexpr,
                       EVEN_N: tl.constexpr, FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_N keys of one (batch, key/value head); loops over the GROUP
        query heads that share it and over their query blocks, so dK and dV of the shared
        head are complete sums when stored (no atomics). SEGR (B, 2, S): query ranges."""
        start_n = tl.program_id(0) * BLOCK_N
        hk64 = tl.program_id(1).to(tl.int64)
        b64 = tl.program_id(2).to(tl.int64)
        rows_n = tl.arange(0, BLOCK_N)
        offs_n = start_n + rows_n
        cols = tl.arange(0, BLOCK_D)
        k = _load_rows(K + b64 * stride_kb + hk64 * stride_kh, start_n, rows_n, cols, stride_ks, S, HEAD_DIM,
                       not EVEN_N, BLOCK_D != HEAD_DIM)
        v = _load_rows(V + b64 * stride_vb + hk64 * stride_vh, start_n, rows_n, cols, stride_vs, S, HEAD_DIM,
                       not EVEN_N, BLOCK_D != HEAD_DIM)
        if FP32_DOTS:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        segq_base = SEGQ + b64 * T
        seg_k = offs_n  # the keys' segment ids (HAS_SEG) and padding flags (HAS_KPM), loaded once
        keep = offs_n
        lo = 0
        hi = T
        if HAS_SEG:
            seg_k = tl.load(SEGK + b64 * S + offs_n, mask=offs_n < S, other=-1)
            lo, hi = _segment_range(SEGR + b64 * 2 * S, offs_n, S, T, BLOCK_M)
        if HAS_KPM:
            keep = (tl.load(KPM + b64 * S + offs_n, mask=offs_n < S, other=0) != 0)[:, None]
        m_lo = lo
        m_full = lo
        if CAUSAL:
            # queries < start_n − (S − T) see none of these keys: skipped. Queries from m_full
            # on see all of them: no causal mask there.
            m_lo = tl.maximum(tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M, lo)
            m_full = tl.maximum(start_n + BLOCK_N - 1 - (S - T), m_lo)
            m_full = tl.minimum((m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, (T + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
            m_full = tl.maximum(m_full, m_lo)
        for g in range(GROUP):
            h64 = hk64 * GROUP + g  # a query head reading this key/value head
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            lse_base = LSE + (b64 * H + h64) * T
            delta_base = DELTA + (b64 * H + h64) * T
            bias_row = BIAS + b64 * stride_bb + h64 * stride_bh
            if CAUSAL:
                dk, dv = _dkdv_blocks(dk, dv, k, v, start_n, seg_k, keep, q_base, do_base, lse_base, delta_base,
                                      bias_row, segq_base, stride_qt, stride_dot, stride_bt, stride_bs, T, S,
                                      qk_scale, m_lo, tl.minimum(m_full, hi), HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                                      True, EVEN_M, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
            dk, dv = _dkdv_blocks(dk, dv, k, v, start_n, seg_k, keep, q_base, do_base, lse_base, delta_base,
                                  bias_row, segq_base, stride_qt, stride_dot, stride_bt, stride_bs, T, S,
                                  qk_scale, m_full, hi, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, EVEN_M, EVEN_N,
                                  HAS_BIAS, HAS_KPM, HAS_SEG, FP32_DOTS, DOT_PRECISION)
        _store_rows(DK + b64 * stride_dkb + hk64 * stride_dkh, dk * sm_scale, start_n, rows_n, cols, stride_dks, S,
                    HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
        _store_rows(DV + b64 * stride_dvb + hk64 * stride_dvh, dv, start_n, rows_n, cols, stride_dvs, S,
                    HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)

    @triton.jit
    def _dq_blocks(dq, q, do, lse, delta, start_m, seg_q, k_base, v_base, bias_row, kpm_base, segk_base, ds_row,
                   stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale, lo, hi,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL_STEP: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, STORE_DS: tl.constexpr,
                   FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Accumulate dQ += dS K (without the scale) over the key blocks [lo, hi); write dS
        itself when the bias needs its gradient (ds_row: this block's first row of the
        contiguous (T, S) plane; the tiles not visited keep the buffer's 0)."""
        cols = tl.arange(0, BLOCK_D)
        rows_m = tl.arange(0, BLOCK_M)
        rows_n = tl.arange(0, BLOCK_N)
        offs_m = start_m + rows_m
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + rows_n
            k = _load_rows(k_base, start_n, rows_n, cols, stride_ks, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
            v = _load_rows(v_base, start_n, rows_n, cols, stride_vs, S, HEAD_DIM, not EVEN_N, BLOCK_D != HEAD_DIM)
            if FP32_DOTS:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N)
            b = s
            keep = s
            same = s
            if HAS_BIAS:
                b = _load_bias(bias_row, start_m, start_n, rows_m[:, None], rows_n[None, :], stride_bt, stride_bs,
                               T, S, not EVEN_M, not EVEN_N)
            if HAS_KPM:
                keep = (tl.load(kpm_base + offs_n, mask=offs_n < S, other=0) != 0)[None, :]
            if HAS_SEG:
                seg_k = tl.load(segk_base + offs_n, mask=offs_n < S, other=-1)
                same = seg_q[:, None] == seg_k[None, :]  # (M, N)
            s = _scores(s, offs_m[:, None], offs_n[None, :], b, keep, same, S, S - T, CAUSAL_STEP, not EVEN_N,
                        HAS_BIAS, HAS_KPM, HAS_SEG)
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dP = dO Vᵀ
            ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − D)
            if STORE_DS:
                tl.store(ds_row + start_n + (rows_m[:, None] * S + rows_n[None, :]), ds,
                         mask=(offs_m[:, None] < T) & (offs_n[None, :] < S))
            ds_in = ds.to(k_base.dtype.element_ty)
            if FP32_DOTS:
                ds_in = ds_in.to(tl.float32)
            dq = tl.dot(ds_in, k, dq, input_precision=DOT_PRECISION)  # dQ += dS K
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, BIAS, KPM, SEGQ, SEGK, SEGR, DS,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dot,
                     stride_dqb, stride_dqh, stride_dqt, stride_bb, stride_bh, stride_bt, stride_bs,
                     H, T, S, GROUP, qk_scale, sm_scale, T_BUCKET, S_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, STORE_DS: tl.constexpr, EVEN_M: tl.constexpr,
                     EVEN_N: tl.constexpr, FP32_DOTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head); the same key-block loop
        bounds as the forward. DS (when STORE_DS) is a contiguous fp32 (B, H, T, S) buffer."""
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        h = tl.program_id(1)
        b64 = tl.program_id(2).to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = (h // GROUP).to(tl.int64)
        rows_m = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows_m
        cols = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, start_m, rows_m, cols, stride_qt, T, HEAD_DIM,
                       not EVEN_M, BLOCK_D != HEAD_DIM)
        do = _load_rows(DO + b64 * stride_dob + h64 * stride_doh, start_m, rows_m, cols, stride_dot, T, HEAD_DIM,
                        not EVEN_M, BLOCK_D != HEAD_DIM)
        row = (b64 * H + h64) * T
        lse = tl.load(LSE + row + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
        if FP32_DOTS:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        seg_q = offs_m  # the queries' segment ids (HAS_SEG), loaded once
        lo = 0
        hi = S
        if HAS_SEG:
            seg_q = tl.load(SEGQ + b64 * T + offs_m, mask=offs_m < T, other=-1)
            lo, hi = _segment_range(SEGR + b64 * 2 * T, offs_m, T, S, BLOCK_N)
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh
        bias_row = BIAS + b64 * stride_bb + h64 * stride_bh
        kpm_base = KPM + b64 * S
        segk_base = SEGK + b64 * S
        ds_row = DS + (row + start_m) * S  # int64: the (B, H, T, S) buffer passes 2³¹ elements early
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if CAUSAL:
            n_end = tl.minimum(tl.maximum(tl.minimum(S, start_m + BLOCK_M + S - T), 0), hi)
            n_full = tl.minimum(tl.maximum(start_m + 1 + S - T, 0) // BLOCK_N * BLOCK_N, n_end)
            dq = _dq_blocks(dq, q, do, lse, delta, start_m, seg_q, k_base, v_base, bias_row, kpm_base, segk_base,
                            ds_row, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale, lo, n_full,
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, EVEN_M, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG,
                            STORE_DS, FP32_DOTS, DOT_PRECISION)
            dq = _dq_blocks(dq, q, do, lse, delta, start_m, seg_q, k_base, v_base, bias_row, kpm_base, segk_base,
                            ds_row, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale,
                            tl.maximum(n_full, lo), n_end, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, EVEN_M, EVEN_N,
                            HAS_BIAS, HAS_KPM, HAS_SEG, STORE_DS, FP32_DOTS, DOT_PRECISION)
        else:
            dq = _dq_blocks(dq, q, do, lse, delta, start_m, seg_q, k_base, v_base, bias_row, kpm_base, segk_base,
                            ds_row, stride_ks, stride_vs, stride_bt, stride_bs, T, S, qk_scale, lo, hi,
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, EVEN_M, EVEN_N, HAS_BIAS, HAS_KPM, HAS_SEG,
                            STORE_DS, FP32_DOTS, DOT_PRECISION)
        _store_rows(DQ + b64 * stride_dqb + h64 * stride_dqh, dq * sm_scale, start_m, rows_m, cols, stride_dqt, T,
                    HEAD_DIM, not EVEN_M, BLOCK_D != HEAD_DIM)

    # --- launch configurations ------------------------------------------------------------
    # EVEN_M / EVEN_N: the sequence lengths are multiples of the block, so no tile sticks
    # out and the loads need no row masks (the common training case, T = S = 2^k).
    _EVEN = {"EVEN_M": lambda a: a["T"] % a["BLOCK_M"] == 0, "EVEN_N": lambda a: a["S"] % a["BLOCK_N"] == 0}

    # GPU candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) by variant and head-dim class
    # (BLOCK_D up to 64, 128, 256), for Hopper (sm_90); `_AMPERE` replaces some for sm_8x.
    # Every candidate of both lists compiles without a spilled register in the worst flags of
    # its variant (tests/kernels/test_attention*.py compile them for sm_90a, and for sm_80 in
    # the exhaustive sweep; `ltk bench kernel-static` reports both at D=128):
    #   plain   no bias, padding or segment ids, T and S multiples of 128: no tile is masked
    #           but the causal diagonal, so the largest tiles fit (the training path);
    #   masked  key padding or segment ids, or ragged lengths: the masks' predicates and
    #           index tiles take registers, so the tiles are smaller;
    #   bias    a (BLOCK_M, BLOCK_N) bias tile more (and dS stored by dQ), even lengths and no
    #           key padding or segment ids: the bias alone, smaller tiles than plain;
    #   bias-masked  the bias with key padding, segment ids or ragged lengths: the bias tile
    #           and the masks' registers together, the smallest tiles (the bias tiles that
    #           fit alone spilled here: 64×64 forward 376 B, 64×32 dQ 160 B at D=128).
    # The forward and dQ keep a tall query block (its fp32 accumulator in registers, K/V
    # streaming through shared memory); dK/dV keeps two fp32 (BLOCK_N, D) accumulators, so
    # its key block shrinks as D grows. Where a 4-warp tile ran out of registers, the fix is
    # the same tile on 8 warps (half the accumulator per thread), a taller query block on 8
    # warps, or one stage fewer (the prefetched tiles' addresses and predicates are live
    # across the loop body): noted at each entry with what the old candidate spilled (sm_90a,
    # fp16, dS stored, the worst flags of the variant: key padding and ragged lengths but in
    # plain and bias). Autotuned once per head dim,
    # flags, dtype and bucket of the sequence lengths (the bucket says whether a length is ragged).
    _GPU_BLOCKS = {
        "plain": {
            "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3)], 128: [(128, 64, 8, 3), (128, 128, 8, 2)],
                    256: [(64, 32, 4, 2)]},
            "dkdv": {64: [(64, 64, 4, 3), (32, 64, 4, 3)], 128: [(32, 64, 8, 3), (32, 32, 4, 3)],
                     256: [(16, 32, 8, 2)]},
            "dq": {64: [(128, 64, 8, 2), (64, 64, 4, 3)], 128: [(128, 64, 8, 2), (64, 64, 8, 3)],
                   256: [(32, 32, 4, 2)]},
        },
        "masked": {
            "fwd": {64: [(128, 64, 8, 3), (64, 64, 4, 3)], 128: [(128, 64, 8, 3)], 256: [(32, 32, 4, 2)]},
            # D=128: 32×32 w4 s3 spilled 16 B (148 B with segment ids alone); 64 queries on 8 warps
            # fit in 236 registers, at 36 SASS per score (was 40)
            "dkdv": {64: [(32, 64, 4, 3), (32, 32, 4, 3)], 128: [(64, 32, 8, 2)], 256: [(16, 32, 8, 2)]},
            # D=256: 32×32 w4 s2 spilled 24 B
            "dq": {64: [(128, 64, 8, 2), (64, 64, 4, 3)], 128: [(128, 32, 8, 2), (64, 32, 4, 2)],
                   256: [(32, 32, 4, 1), (32, 32, 8, 2)]},
        },
        "bias": {
            "fwd": {64: [(128, 64, 8, 3)], 128: [(64, 64, 4, 2), (64, 64, 8, 2)], 256: [(32, 32, 4, 2)]},
            # D=128: 32×32 w4 s2 spilled 16 B (fp16, even lengths too): the bias-masked tiles
            "dkdv": {64: [(32, 32, 4, 3)], 128: [(32, 32, 4, 1), (32, 32, 8, 2)], 256: [(16, 32, 8, 2)]},
            "dq": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2), (64, 32, 8, 2)], 256: [(32, 32, 4, 2)]},
        },
        "bias-masked": {
            # D=128: 64×64 w4 s2 spilled 376 B; D=256: 32×32 w4 s2 spilled 16 B
            "fwd": {64: [(128, 64, 8, 3)], 128: [(64, 32, 4, 2), (64, 64, 8, 2)], 256: [(64, 32, 8, 2)]},
            # D=64: 32×32 w4 s3 spilled 48 B; D=128: 32×32 w4 s2 spilled 256 B
            "dkdv": {64: [(32, 32, 4, 2)], 128: [(32, 32, 4, 1), (32, 32, 8, 2)], 256: [(16, 32, 8, 2)]},
            # D=128: 64×32 w4 s2 spilled 160 B; D=256: 32×32 w4 s2 spilled 112 B
            "dq": {64: [(64, 32, 4, 2)], 128: [(32, 32, 4, 2), (64, 32, 8, 2)], 256: [(32, 32, 8, 2)]},
        },
    }
    # Ampere (sm_80, and the sm_8x parts Triton compiles the same way): mma.sync, no wgmma, so
    # operands and accumulators take other registers; the entries of `_GPU_BLOCKS` that spill
    # there, replaced (stack bytes of the old candidate, sm_80, worst flags of the variant):
    # (variant, kernel, head-dim class) -> candidates
    _AMPERE = {
        ("plain", "fwd", 128): [(128, 64, 8, 3)],  # 128×128 w8 s2: 80 B; the 128×64 tile covers it
        ("masked", "fwd", 128): [(64, 64, 4, 3)],  # 128×64 w8 s3: 8 B
        ("masked", "fwd", 256): [(32, 32, 4, 1), (32, 32, 8, 2)],  # 32×32 w4 s2: 8 B
        ("masked", "dkdv", 64): [(32, 32, 4, 3)],  # 32×64 w4 s3: 240 B (on 8 warps still 400)
        ("masked", "dq", 64): [(128, 32, 8, 2), (64, 32, 4, 2)],  # 128×64 w8 s2: 56 B, 64×64 w4 s3: 64 B
        ("masked", "dq", 128): [(64, 32, 4, 2)],  # 128×32 w8 s2: 32 B
        ("bias-masked", "fwd", 128): [(64, 64, 8, 2), (32, 32, 4, 2)],  # 64×32 w4 s2: 8 B
        ("bias-masked", "dkdv", 64): [(32, 32, 4, 1)],  # 32×32 w4 s2: 8 B
        ("bias-masked", "dkdv", 128): [(32, 32, 4, 1)],  # 32×32 w8 s2: 8 B
        ("bias-masked", "dkdv", 256): [(16, 32, 8, 1)],  # 16×32 w8 s2: 8 B
        ("bias-masked", "dq", 64): [(64, 32, 4, 1), (32, 32, 4, 2)],  # 64×32 w4 s2: 16 B
    }
    # fp32 inputs: IEEE fp32 dots run on the FMA units, not the tensor cores, and large tiles
    # only make the unrolled code slow to compile: one modest tile, no tuning (fp32 is the
    # exact path, bf16/fp16 the fast one)
    _FP32_BLOCKS = {64: (32, 32, 4, 2), 128: (32, 32, 4, 2), 256: (32, 32, 4, 1)}
    ARCHS = (90, 80)  # a list each: sm_90 and later take Hopper's, sm_8x Ampere's

    def variant(has_bias: bool, has_kpm: bool, has_seg: bool, T: int, S: int) -> str:
        """Which candidate table a launch draws from (see `_GPU_BLOCKS`): the flags the launch
        already has (a mask, segment ids) and whether a length is ragged (not a multiple of 128,
        the largest block; a multiple of it is a multiple of every block, so EVEN_M and EVEN_N
        hold for every candidate)."""
        masked = has_kpm or has_seg or T % 128 or S % 128
        if has_bias:
            return "bias-masked" if masked else "bias"
        return "masked" if masked else "plain"

    def gpu_blocks(arch: int, kind: str, kernel: str, d_class: int) -> list:
        """The (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for compute capability
        `arch` (90: Hopper, 80: Ampere; see `ARCHS`): the one place that says which tiles run where,
        read by the pruner at launch, the compile tests and the static report."""
        if arch < 90:
            return _AMPERE.get((kind, kernel, d_class), _GPU_BLOCKS[kind][kernel][d_class])
        return _GPU_BLOCKS[kind][kernel][d_class]

    def _gpu_configs(kernel: str, block_d: int | None = None, fp32: bool = False, kind: str = "plain",
                     arch: int = 90):
        """The candidates of one kernel for one head-dim class, dtype, variant and architecture;
        with no block_d, those of every class, variant and architecture (the autotuner's list,
        pruned at each launch by `_pruner`)."""
        if block_d is None:
            blocks = [b for a in ARCHS for k in _GPU_BLOCKS for d in (64, 128, 256)
                      for b in gpu_blocks(a, k, kernel, d)]
            blocks += list(_FP32_BLOCKS.values())
        else:
            d_class = min(d for d in (64, 128, 256) if d >= block_d)
            blocks = [_FP32_BLOCKS[d_class]] if fp32 else gpu_blocks(arch, kind, kernel, d_class)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in dict.fromkeys(blocks)]

    def _pruner(kernel: str):
        def prune(configs, named_args, **kwargs):
            kind = variant(kwargs["HAS_BIAS"], kwargs["HAS_KPM"], kwargs["HAS_SEG"], named_args["T"], named_args["S"])
            keep = {str(c) for c in _gpu_configs(kernel, kwargs["BLOCK_D"], kwargs["DOT_PRECISION"] == "ieee", kind,
                                                 device_arch())}
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
