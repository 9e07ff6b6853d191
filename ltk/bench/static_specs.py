"""What `ltk bench kernel-static` compiles: one `Spec` per kernel launch, ours, Liger-Kernel's and a floor.

A spec names the kernel ("module:attribute": a `@triton.jit` function, or the `triton.autotune` /
`triton.heuristics` object wrapping one), the dtype of each pointer ("T" is the dtype being
compiled, fp16 or bf16), the compile-time constants at a representative shape, and its candidate
configs. Where the kernel is autotuned the candidates are the autotuner's own `.configs`,
pruned by its `early_config_prune` as a launch at that shape would prune them; otherwise the
launcher's fixed config. Arguments not named are i32 (sizes, strides); `floats` are fp32
scalars; pointers, and the arguments in `aligned`, are specialized as multiples of 16, as a
launch with contiguous tensors specializes them; arguments in `ones` (unit strides) become the
constant 1, as Triton specializes an integer argument equal to 1. Constants the kernel does not take are
dropped, so a spec keeps compiling while a kernel gains or loses flags: when kernels/ changes,
this list is the one place to update.

`unit` says what one iteration of the kernel's innermost loop (or one program, for a kernel
without a loop) works on, and `units(constexprs, num_warps)` how many of them: the report
divides the loop's instructions × threads by it ("instructions per score per thread",
"per element"). None means the count is per thread per iteration (a GEMM's k-step).

The floor is the Triton tutorial's matmul (`_floor_matmul_kernel` below, "Matrix
Multiplication", triton-lang.org tutorial 03, with its grouped tile order): a k-loop that only
loads two tiles and multiplies them, at the tiles NF4 and LoRA use; any instruction a fused
kernel spends above it is the price of its fusion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ltk.kernels.backend import HAS_TRITON


@dataclass(frozen=True)
class Candidate:
    kwargs: dict
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        tiles = "×".join(str(v) for k, v in self.kwargs.items() if k.startswith("BLOCK") and k != "BLOCK_D")
        if "ROWS" in self.kwargs:
            tiles = f"{self.kwargs['ROWS']}×{tiles}"
        flags = [str(v) for k, v in self.kwargs.items() if not k.startswith("BLOCK") and k != "ROWS"]  # e.g. LUT
        return " ".join([tiles] * bool(tiles) + flags + [f"w{self.num_warps} s{self.num_stages}"])


@dataclass(frozen=True)
class Spec:
    name: str  # e.g. "attention.fwd causal"
    provider: str  # ours | liger | floor
    kernel: str  # "module:attribute"
    shape: str  # the representative shape, in words
    pointers: dict
    constexprs: Callable[[str], dict]  # dtype name -> constants
    unit: str = "k-step"
    units: Callable[[dict, int], float] | None = None
    # (dtype, arch) -> the candidates compiled for that target (the kernel module's per-arch list);
    # None: the autotuner's, pruned
    candidates: Callable[[str, str], list[Candidate]] | None = None
    floats: tuple = ()
    aligned: tuple = ()
    ones: tuple = ()  # integer arguments equal to 1 at the launch (unit strides): Triton makes them constants
    warps_stages: tuple = (4, 3)  # Triton's launch defaults, for a kernel launched without a config
    extra: dict = field(default_factory=dict)


def _fixed(*cands: Candidate) -> Callable[[str, str], list[Candidate]]:
    return lambda dtype, arch: list(cands)


def _cc(arch: str) -> int:
    """The compute capability of a target name: "sm_90a" -> 90, "sm_80" -> 80."""
    return int(arch[3:5])


def _tile_units(*names: str):
    """Units per iteration = the product of the named constants (a (BLOCK_M, BLOCK_N) score tile)."""
    def f(c, warps):
        out = 1
        for n in names:
            out *= c[n]
        return out
    return f


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _floor_matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
        """C = A · B, the tutorial's kernel: grouped program order, masked K tail, fp32 accumulator."""
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M     # (BLOCK_M,), wrapped: no mask on loads
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N     # (BLOCK_N,)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(C + cm[:, None] * stride_cm + cn[None, :] * stride_cn, acc.to(C.dtype.element_ty),
                 mask=(cm[:, None] < M) & (cn[None, :] < N))


def _attention_specs() -> list[Spec]:
    """Forward (causal; with a bias; with a bias and key padding; with segment ids), dK/dV and dQ in
    the same four variants, and the backward's preprocess, at D = 128, T = S = 4096. Each variant
    compiles its own candidate table (attention_triton._gpu_configs: "plain" for causal, "bias",
    "bias-masked" for a bias with key padding, "masked" for segment ids), as a launch with those
    flags would draw from it (attention_triton.variant)."""
    import ltk.kernels.attention_triton as at

    ptrs = dict(Q="T", K="T", V="T", O="T", DO="T", DQ="T", DK="T", DV="T", LSE="fp32", DELTA="fp32", DS="fp32",
                BIAS="fp32", KPM="u8", SEGQ="i32", SEGK="i32", SEGR="i32")
    # every row stride of the contiguous (B, H, T, D) tensors and the (B, H, T, S) bias: multiples of 16
    strides = tuple(f"stride_{a}{b}" for a in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "b") for b in "bhts")
    strides = tuple(s for s in strides if s != "stride_bs")

    def flags(bias=False, seg=False, kpm=False, **more):
        return lambda dtype: dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=True, HAS_BIAS=bias, HAS_KPM=kpm,
                                  HAS_SEG=seg, EVEN_M=True, EVEN_N=True, FP32_DOTS=False, DOT_PRECISION=None,
                                  **more)

    def table(kernel, kind):
        return lambda dtype, arch: [Candidate(dict(c.kwargs), c.num_warps, c.num_stages)
                                    for c in at._gpu_configs(kernel, 128, kind=kind, arch=_cc(arch))]
    shape = "B·H=32, T=S=4096, D=128"
    common = dict(provider="ours", pointers=ptrs, floats=("qk_scale", "sm_scale"), aligned=strides,
                  ones=("stride_bs",), unit="score", units=_tile_units("BLOCK_M", "BLOCK_N"))
    mod = "ltk.kernels.attention_triton:"
    out = []
    for kernel, name, attr, more in (("fwd", "fwd", "_attn_fwd_tuned", {}),
                                     ("dkdv", "bwd dkdv", "_attn_bwd_dkdv_tuned", {}),
                                     ("dq", "bwd dq", "_attn_bwd_dq_tuned", dict(STORE_DS=False))):
        for variant, kind, what, bias, seg, kpm in (
                ("causal", "plain", "", False, False, False),
                ("causal+bias", "bias", ", fp32 bias", True, False, False),
                ("causal+bias+padding", "bias-masked", ", fp32 bias, key padding", True, False, True),
                ("causal+segments", "masked", ", segment ids", False, True, False)):
            extra = dict(more, STORE_DS=True) if bias and kernel == "dq" else more  # dQ stores dS for dbias
            out.append(Spec(f"attention.{name} {variant}", kernel=mod + attr, shape=shape + what,
                            constexprs=flags(bias=bias, seg=seg, kpm=kpm, **extra), candidates=table(kernel, kind),
                            **common))
    out.append(Spec("attention.bwd preprocess", "ours", mod + "_attn_bwd_preprocess", shape, ptrs,
                    lambda dtype: dict(HEAD_DIM=128, BLOCK_D=128), unit="element",
                    units=_tile_units("BLOCK_M", "BLOCK_D"), candidates=_fixed(Candidate(dict(BLOCK_M=64), 4, 3)),
                    aligned=strides))
    return out


def _gemm_like_specs() -> list[Spec]:
    """NF4 dequant-matmul (forward y = x·Wᵀ, backward dx = dy·W: every autotune candidate, and the
    flat path's fixed tile for W that is not row-aligned) and its dequantize kernel; the fused LoRA
    GEMM as forward (y = x·Wᵀ + s·u·Bᵀ + b) and dx (dy·W + s·g·A, W and A read transposed by
    strides), every candidate, and its skinny u = x·Aᵀ / g = dy·B kernel; M = N = K = 4096
    (NF4: M up to 256, where the fused kernel runs; blocksize 64; rank 16); the floor at every tile NF4 and LoRA use."""
    import ltk.kernels.lora_triton as lt
    import ltk.kernels.nf4_triton as nt

    def nf4_cands(configs, per_arch=True):
        return lambda dtype, arch: [Candidate(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, LUT=lut), w, s)
                                    for m, n, k, w, s, lut in (nt.arch_configs(_cc(arch), configs)
                                                               if per_arch else configs)]
    nf4_ptrs = dict(X="T", Y="T", DY="T", DX="T", PACKED="u8", ABSMAX="fp32", CODE="fp32", OUT="T")

    def nf4_consts(rows: bool):
        return lambda dtype: dict(FP32_DOTS=False, DOT_PRECISION=None, BLOCKSIZE=64, ROW_ALIGNED=rows)
    lora_ptrs = dict(X="T", P="T", V="fp32", Q="T", BIAS="T", C="T", OUT="fp32")
    def lora_cands(dtype, arch):
        return [Candidate(dict(BLOCK_M=m, BLOCK_O=o, BLOCK_L=k), w, s) for m, o, k, w, s in lt.arch_tiles(_cc(arch))]

    def lora_consts(bias: bool):
        return lambda dtype: dict(HAS_BIAS=bias, EVEN_L=True, BLOCK_R=lt.RANK_STEP, GROUP_M=lt.GROUP_M,
                                  FP32_DOTS=False, DOT_PRECISION=None, EPI_PRECISION="tf32")
    skinny = lambda dtype, arch: [Candidate(dict(BLOCK_M=lt.SKINNY_BLOCK_M, BLOCK_L=64), 4, 3)]  # noqa: E731
    skinny_consts = lambda dtype: dict(BLOCK_R=16, FP32_DOTS=False, DOT_PRECISION=None)  # noqa: E731
    shape = "M=N=K=4096"
    floor_ptrs = dict(A="T", B="T", C="T")
    floor_aligned = ("stride_am", "stride_bk", "stride_cm", "M", "N", "K")
    # the floor: one spec per tile (BLOCK_M, BLOCK_N, BLOCK_K), its candidates the (warps, stages) used
    tiles: dict[tuple, list] = {}
    for m, n, k, w, s, _ in nt.GPU_CONFIGS:
        tiles.setdefault((m, n, k), []).append((w, s))
    for m, o, k, w, s in lt.TC_TILES:
        tiles.setdefault((m, o, k), []).append((w, s))

    def floor(bm, bn, bk, ws):
        cands = [Candidate(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), w, s) for w, s in dict.fromkeys(ws)]
        return Spec(f"floor.matmul {bm}x{bn}x{bk}", "floor", "ltk.bench.static_specs:_floor_matmul_kernel", shape,
                    floor_ptrs, lambda dtype: dict(GROUP_M=8), candidates=_fixed(*cands),
                    aligned=floor_aligned, ones=("stride_ak", "stride_bn", "stride_cn"))
    nf4 = "ltk.kernels.nf4_triton:"
    # the fused kernel runs at M ≤ nf4.FUSED_MAX_M (dequantize + cuBLAS above); M does not change its code
    nf4_shape = "M ≤ 256, N=K=4096, blocksize 64"
    lora = "ltk.kernels.lora_triton:"
    return [
        Spec("nf4.matmul_fwd", "ours", nf4 + "_fwd_tuned", nf4_shape, nf4_ptrs, nf4_consts(True),
             candidates=nf4_cands(nt.GPU_CONFIGS), aligned=("M", "N", "K")),
        Spec("nf4.matmul_bwd", "ours", nf4 + "_bwd_tuned", nf4_shape, nf4_ptrs, nf4_consts(True),
             unit="n-step", candidates=nf4_cands(nt.BWD_CONFIGS), aligned=("M", "N", "K")),
        Spec("nf4.matmul_fwd flat", "ours", nf4 + "_matmul_fwd_kernel", "M=N=4096, K=4095 (not row-aligned)",
             nf4_ptrs, nf4_consts(False), candidates=nf4_cands([nt.FLAT_CONFIG], per_arch=False)),
        Spec("nf4.matmul_bwd flat", "ours", nf4 + "_matmul_bwd_kernel", "M=N=4096, K=4095 (not row-aligned)",
             nf4_ptrs, nf4_consts(False), unit="n-step", candidates=nf4_cands([nt.FLAT_CONFIG], per_arch=False)),
        Spec("nf4.dequant", "ours", nf4 + "_dequant_kernel", "4096×4096 weights, blocksize 64", nf4_ptrs,
             lambda dtype: dict(BLOCKSIZE=64, BLOCK=nt._DEQUANT_BLOCK), unit="element",
             units=_tile_units("BLOCK"), candidates=_fixed(Candidate({}, 4, 3)), aligned=("numel",)),
        Spec("lora.gemm_lowrank fwd", "ours", lora + "_gemm_lowrank_tuned", shape + ", r=16, bias", lora_ptrs,
             lora_consts(True), candidates=lora_cands, floats=("scale",),
             aligned=("M", "O", "L", "R", "M_BUCKET", "stride_po", "stride_qo"), ones=("stride_pl", "stride_qr")),
        Spec("lora.gemm_lowrank dx", "ours", lora + "_gemm_lowrank_tuned", shape + ", r=16", lora_ptrs,
             lora_consts(False), candidates=lora_cands, floats=("scale",),
             aligned=("M", "O", "L", "R", "M_BUCKET", "stride_pl", "stride_qr"), ones=("stride_po", "stride_qo")),
        Spec("lora.skinny u=x·Aᵀ", "ours", lora + "_skinny_kernel", shape + ", r=16", lora_ptrs, skinny_consts,
             candidates=skinny, unit="l-step", aligned=("M", "L", "R", "stride_pr"), ones=("stride_pl",)),
        Spec("lora.skinny g=dy·B", "ours", lora + "_skinny_kernel", shape + ", r=16", lora_ptrs, skinny_consts,
             candidates=skinny, unit="l-step", aligned=("M", "L", "R", "stride_pl"), ones=("stride_pr",)),
    ] + [floor(*t, ws) for t, ws in tiles.items()]


def _norm_specs() -> list[Spec]:
    """LayerNorm and RMSNorm, forward and backward, ours and Liger's, at 4096 rows × 4096; ours also
    in the residual variant (h = x + residual; the backward adds dh), which Liger does not fuse."""
    from ltk.kernels.norm_common import launch_config

    m, n = 4096, 4096
    shape = f"{m}×{n}"
    out = []
    for op, module in (("layernorm", "ltk.kernels.layernorm"), ("rmsnorm", "ltk.kernels.rmsnorm")):
        prefix = "_layer_norm" if op == "layernorm" else "_rms_norm"
        for bwd, residual in ((False, False), (True, False), (False, True), (True, True)):
            block_n, rows, warps = launch_config(m, n, backward=bwd)
            consts = dict(HAS_RESIDUAL=residual, HAS_BIAS=True, HAS_DH=residual)
            out.append(Spec(f"{op}.{'bwd' if bwd else 'fwd'}{' residual' if residual else ''}", "ours",
                            f"{module}:{prefix}_{'bwd' if bwd else 'fwd'}_kernel", shape,
                            dict(X="T", R="T", W="T", B="fp32" if op == "layernorm" else "T", Y="T", H="T",
                                 DY="T", DH="T", DX="T", MEAN="fp32", RSTD="fp32", DW_PART="fp32",
                                 DB_PART="fp32"),
                            lambda dtype, c=consts: dict(c), unit="element", units=_tile_units("ROWS", "BLOCK_N"),
                            candidates=_fixed(Candidate(dict(ROWS=rows, BLOCK_N=block_n), warps, 3)), floats=("eps",),
                            aligned=("M", "N")))
    return out


def _glu_specs() -> list[Spec]:
    """SwiGLU and GeGLU (tanh, erf), forward and backward, recomputing act(g) and with it saved, at
    4096 rows × 14336 (Llama-3-8B's MLP): one BLOCK-element program, no loop."""
    import ltk.kernels.swiglu as sw

    out = []
    for name, act in (("swiglu", "silu"), ("geglu-tanh", "gelu_tanh"), ("geglu", "gelu")):
        for saved in (False, True):
            for kernel, flag in (("fwd", "SAVE_ACT"), ("bwd", "HAS_ACT")):
                consts = {"ACT": sw.ACTIVATIONS[act], flag: saved}
                out.append(Spec(f"{name}.{kernel}{' saved' if saved else ''}", "ours",
                                f"ltk.kernels.swiglu:_glu_{kernel}_kernel", "4096×14336",
                                dict(G="T", U="T", Y="T", A="T", DY="T", DG="T", DU="T"),
                                lambda dtype, c=consts: dict(c), unit="element", units=_tile_units("BLOCK"),
                                candidates=_fixed(Candidate(dict(BLOCK=sw.BLOCK), sw.NUM_WARPS, 3)), aligned=("N",)))
    return out


def _rope_specs() -> list[Spec]:
    """RoPE forward and backward on q and k of Llama-3-8B's attention (32 + 8 heads × 128, B·T = 4096)
    in the models' strided (B, T, H, D) layout with cos/sin in the activations' dtype, and the
    in-place launch (one tensor: 0 heads of k). Unit: an element of the (heads × tokens × D) tile
    one pass of the head loop rotates."""
    import ltk.kernels.rope as rp

    out = []
    for name, hk, backward in (("rope.fwd", 8, False), ("rope.bwd", 8, True), ("rope.fwd in place", 0, False)):
        block_half, hbq, hbk, block_t = rp.launch_config(4096, 32, hk, 64)
        consts = dict(BACKWARD=backward, OFFS_64=False)
        strides = ("sqb", "sqh", "sqt", "skb", "skh", "skt", "sob", "soh", "sot", "spb", "sph", "spt",
                   "scb", "sct", "ssb", "sst")
        out.append(Spec(name, "ours", "ltk.kernels.rope:_rope_kernel", f"32+{hk} heads × 128, B·T=4096",
                        dict(Q="T", K="T", QO="T", KO="T", COS="T", SIN="T"), lambda dtype, c=consts: dict(c),
                        unit="element", units=lambda c, w: 2 * c["HBQ"] * c["BLOCK_T"] * c["BLOCK_HALF"],
                        candidates=_fixed(Candidate(dict(BLOCK_T=block_t, BLOCK_HALF=block_half, HBQ=hbq, HBK=hbk),
                                                    rp.NUM_WARPS, 3)),
                        aligned=strides + ("T", "HQ", "HALF") + (("HK",) if hk % 16 == 0 else ()),
                        ones=("sqd", "skd", "sod", "spd", "scd", "ssd")))
    return out


def _ce_specs() -> list[Spec]:
    """Our cross-entropy (ltk/kernels/cross_entropy.py, the kernel the fused linear cross-entropy
    calls per chunk) over 4096 rows × V = 32000, Liger's shape below: the loss and the gradient
    written over the logits in one launch (WRITE_GRAD), two passes over each row, BLOCK elements
    an iteration."""
    import ltk.kernels.cross_entropy as ce

    block, warps = ce.launch_config(32000)
    return [Spec("cross_entropy.fwd+bwd", "ours", "ltk.kernels.cross_entropy:_ce_kernel", "4096 rows × V=32000",
                 dict(X="T", Y="i64", LOSS="fp32"), lambda dtype: dict(HAS_SOFTCAP=False, WRITE_GRAD=True),
                 unit="element", units=_tile_units("BLOCK"), candidates=_fixed(Candidate(dict(BLOCK=block), warps, 3)),
                 floats=("smoothing", "z_loss", "softcap", "scale"), aligned=("stride", "V"))]


def _liger_specs() -> list[Spec]:
    """Liger-Kernel's RMSNorm, LayerNorm, SwiGLU, RoPE and cross-entropy kernels as its launchers
    configure them (liger_kernel.ops.utils.calculate_settings: BLOCK_SIZE = next power of two of the
    row, 4/8/16/32 warps), at 4096 × 4096 for the norms, an 11008-wide SwiGLU row, Llama-2-7B's RoPE
    (32 heads × 128) and a 32000-word vocabulary for cross-entropy (32 warps, Liger's H100 setting)."""
    try:
        from liger_kernel.ops.utils import calculate_settings
    except ImportError:
        return []

    def spec(name, kernel, shape, ptrs, consts, n_elems, warps, floats=(), aligned=(), ones=()):
        c = consts("bf16")
        tile = {"BLOCK_SIZE": c["BLOCK_SIZE"]} if "BLOCK_SIZE" in c else {}
        return Spec(name, "liger", "liger_kernel.ops." + kernel, shape, ptrs, lambda dtype: consts(dtype),
                    unit="element", units=lambda c, w: n_elems, candidates=_fixed(Candidate(tile, warps, 3)),
                    floats=floats, aligned=aligned, ones=ones)
    block, warps = calculate_settings(4096)
    dt = {"fp16": tl.float16, "bf16": tl.bfloat16} if HAS_TRITON else {}
    norm_ptrs = dict(Y_ptr="T", X_ptr="T", W_ptr="T", B_ptr="T", RSTD_ptr="fp32", Mean_ptr="fp32", dY_ptr="T",
                     dX_ptr="T", DX_ptr="T", DY_ptr="T", dW_ptr="fp32", DW_ptr="fp32", DB_ptr="fp32")
    strides = ("Y_row_stride", "X_row_stride", "stride_x", "stride_dx", "stride_dy", "dY_row_stride",
               "dX_row_stride", "n_cols")
    sw_block, sw_warps = calculate_settings(11008)
    ce_block = min(65536 // 2, triton.next_power_of_2(32000)) if HAS_TRITON else 0
    return [
        spec("rmsnorm.fwd", "rms_norm:_rms_norm_forward_kernel", "4096×4096", norm_ptrs,
             lambda d: dict(casting_mode=0, elementwise_affine=True, BLOCK_SIZE=block), block, warps,
             ("eps", "offset"), strides),
        spec("rmsnorm.bwd", "rms_norm:_rms_norm_backward_kernel", "4096×4096", norm_ptrs,
             lambda d: dict(X_dtype=dt[d], casting_mode=0, elementwise_affine=True, BLOCK_SIZE=block,
                            COMPUTE_DW=True), block, warps, ("offset",), strides),
        spec("layernorm.fwd", "layer_norm:_layer_norm_forward_kernel", "4096×4096", norm_ptrs,
             lambda d: dict(BLOCK_SIZE=block), block, warps, ("eps",), strides),
        spec("layernorm.bwd", "layer_norm:_layer_norm_backward_kernel", "4096×4096", norm_ptrs,
             lambda d: dict(rows_per_program=32, BLOCK_SIZE=block, COMPUTE_DW=True, COMPUTE_DB=True), block,
             warps, (), strides),
        spec("swiglu.fwd", "swiglu:_swiglu_forward_kernel", "4096×11008", dict(a_ptr="T", b_ptr="T", c_ptr="T"),
             lambda d: dict(n_cols=11008, BLOCK_SIZE=sw_block), 11008, sw_warps, ("gate_multiplier",), ("stride",)),
        spec("swiglu.bwd", "swiglu:_swiglu_backward_kernel", "4096×11008",
             dict(dc_ptr="T", a_ptr="T", b_ptr="T"),
             lambda d: dict(n_cols=11008, BLOCK_SIZE=sw_block), 11008, sw_warps, ("gate_multiplier",), ("stride",)),
        spec("rope.fwd", "rope:_triton_rope", "B·T=4096, 32+32 heads × 128",
             dict(q_ptr="T", k_ptr="T", cos="T", sin="T"),
             lambda d: dict(bs=1, cos_bs=1, n_qh=32, n_kh=32, hd=128, pad_n_qh=32, pad_n_kh=32, pad_hd=128,
                            pad_rd=128, rd=128, BLOCK_SIZE=32, BACKWARD_PASS=False), 64 * 128, 4, (),
             ("q_row_stride", "k_row_stride", "cos_row_stride", "sin_row_stride")),
        spec("cross_entropy.fwd+bwd", "cross_entropy:liger_cross_entropy_kernel", "4096 rows × V=32000",
             dict(X_ptr="T", Y_ptr="i64", weight_ptr="fp32", loss_ptr="fp32", z_loss_ptr="fp32",
                  token_accuracy_ptr="fp32", predicted_tokens_ptr="i64"),
             lambda d: dict(lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", RETURN_Z_LOSS=False,
                            RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=ce_block,
                            HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True),
             ce_block, 32, ("sum_non_ignore_weight", "weight_sum", "softcap"), ("X_stride", "n_cols"),
             ("Y_stride", "loss_stride")),
    ]


def all_specs() -> list[Spec]:
    """Every spec: ours (attention, NF4, LoRA, norms, SwiGLU/GeGLU, RoPE, cross-entropy), the matmul floor, Liger's
    (when installed)."""
    return (_attention_specs() + _gemm_like_specs() + _norm_specs() + _glu_specs() + _rope_specs() + _ce_specs()
            + _liger_specs())
