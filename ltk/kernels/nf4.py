"""NF4 weights, QLoRA style: 4-bit NormalFloat blockwise quantization, double quantization
of the scales, a fused dequantize-matmul and an `NF4Linear` layer (Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, section 3).

Format (byte for byte that of bitsandbytes' quantize_4bit(quant_type="nf4")): the weight is
read as a flat vector w of n elements, cut into blocks of `blocksize` (the last may be
short). Per block b (QLoRA eq. 1, absmax scaling):

    absmax_b = max_i |w_i|,   q_i = argmin_j |w_i / absmax_b − NF4[j]|,   ŵ_i = NF4[q_i] · absmax_b

and two 4-bit codes share a byte, the FIRST element in the HIGH nibble (an odd n pads the
last low nibble with the code of 0.0, 7). Storage: n/2 bytes + 4 bytes a block.

Double quantization (QLoRA section 3, "Double Quantization"): the fp32 absmax values are
themselves quantized, after subtracting their mean c (they are all positive, so centring
makes a symmetric 8-bit code useful), blockwise with blocks of 256 and the 8-bit dynamic
data type (Dettmers 2016, arXiv 1511.04561):

    absmax ≈ DYN[q2_j] · s_b + c,   s_b = max_{j ∈ b} |absmax_j − c|

Bits a parameter: 4 + 8/64 + 32/(64·256) ≈ 4.127 (`nf4_bits_per_param`), against
4 + 32/64 = 4.5 without it.

Rounding and ties are those of bitsandbytes' CPU implementation (0.50):
  * 4-bit: full blocks are scaled by the reciprocal, w · (1/absmax) (absmax clamped to
    ≥ 1e-38 for the reciprocal only); the short last block divides, w / absmax, with its
    stored absmax clamped to ≥ 1e-38. The code is found with the midpoints of adjacent code
    values, a value exactly on a midpoint going to the LOWER code (torch.bucketize). (The
    CUDA kernel uses a decision tree with decimal thresholds; only exact-midpoint ties can
    differ.)
  * 8-bit (double quant): nearest code through a 65536-entry table over [−1, 1]:
    t = clamp(v · (1/s), −1, 1), idx = trunc(((t + 1) · 0.5) · 65535 + 0.5) in fp32, and
    table[idx] = the first code whose upper midpoint is not below −1 + 2·idx/65535. A block
    whose scale is 0 stores codes 0.

Matmul: y = x · Wᵀ with W (N, K) in NF4; the reference path dequantizes W to x's dtype and
calls F.linear. The triton backend picks one of two paths by M (rows of x; `fused_path`):

  fused    M ≤ FUSED_MAX_M: the Triton kernel (ltk/kernels/nf4_triton.py) dequantizes each
           tile of W in registers and never writes W; backward dx = dy · W likewise.
  unfused  M > FUSED_MAX_M: the Triton dequantize kernel writes W in x's dtype, then cuBLAS
           (F.linear; dy @ W in the backward, which dequantizes again instead of keeping W).

Cost model (section 5, per weight, d bytes a compute element, blocksize 64):
  bytes  fused 0.5625 (4 bits + an fp32 absmax a block); unfused 0.5625 + 2d more (the
         dequantize pass writes W, the GEMM reads it): 4.56 in bf16, 8× the fused traffic.
  FLOPs  2·M a weight either way; the fused kernel re-dequantizes W for every BLOCK_M rows,
         and its dequantize (≈ 14 instructions a weight in the select-tree form, a pipe that
         also issues the tensor-core work) caps it at a fraction e_f of the tensor-core peak P,
         where cuBLAS reaches e_c.
Time (BW the memory bandwidth), large M, both compute-bound:
    fused    2·M·N·K / (e_f·P)
    unfused  2·M·N·K / (e_c·P) + (0.5625 + d)·N·K / BW
so the fused kernel wins while M < M* = (0.5625 + d)·P / (2·BW·(1/e_f − 1/e_c)) (`crossover_m`).
On an H100 SXM (P = 989 TFLOP/s bf16 dense, BW = 3.35 TB/s: P/BW ≈ 295 FLOP/byte), e_c ≈ 0.75
and e_f ≈ 0.35 (the issue-bound ceiling of the 128×64×64 tile: 360 SASS a k-step per warp,
4 HGMMA, sm_90a), M* ≈ 250: FUSED_MAX_M = 256. Below it, at decode (M ≤ 16), the fused
kernel is issue-bound near 30% of the bandwidth (≈ 1,100 SASS per 64×128 k-step and warp)
and still moves 8× fewer bytes: ≈ 2.4× faster than dequantize + GEMV by this model.
Measured times replace these constants when a GPU runs `python -m bench.gpu_check`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.kernels import nf4_triton
from ltk.kernels.backend import check_float, check_same_device, resolve_backend

# ---------------------------------------------------------------------------------------
# 1. The codes
# ---------------------------------------------------------------------------------------
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
"""The 16 NormalFloat-4 values (QLoRA section 3, eq. 4). With Q_X the quantile function of
N(0, 1) and δ = 0.9677083 (= ½(1 − 1/(2·15) + 1 − 1/(2·16)), where the outermost quantile
stays finite):

    positive half: Q_X(p) for p = linspace(δ, ½, 9)[:-1]  (8 values)
    negative half: −Q_X(p) for p = linspace(δ, ½, 8)[:-1]  (7 values)
    plus an exact 0; all divided by Q_X(δ), so the range is [−1, 1].

Asymmetric (8 positive, 7 negative) so that 0 is exactly representable: zero padding and
zero weights must round-trip. Why quantiles: if the weights of a block are N(0, σ²) —
pretrained weights nearly are — each of the 16 bins then holds the same probability mass,
which makes every code equally likely and the code information-theoretically optimal
(maximum entropy, 4 bits of information per 4-bit code)."""


def nf4_code_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the NF4 values from the normal quantiles (float64), as described above;
    Q_X(p) = √2 · erfinv(2p − 1). Equals NF4_CODE to float32 rounding."""
    q = lambda p: math.sqrt(2) * torch.special.erfinv(2 * p - 1)
    pos = q(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    neg = -q(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return v / v.max()


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic data type (Dettmers 2016, arXiv 1511.04561; bitsandbytes'
    create_dynamic_map): a sign, then k zero bits giving the exponent 10^(−k), an indicator
    bit, and the remaining bits a linear fraction in [0.1, 1] (bin centres). 256 sorted
    values in [−1, 1], with 0 and 1."""
    data = []
    for i in range(7):                          # exponent 10^(i − 6), 2^i fraction bins
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()  # fp32 products
    data += [0.0, 1.0]                          # 254 + 2 = 256 values
    return torch.tensor(sorted(data), dtype=torch.float32)


_CODES: dict = {}


def _code(name: str, device) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _CODES:
        _CODES[key] = (NF4_CODE if name == "nf4" else dynamic_code()).to(device)
    return _CODES[key]


# ---------------------------------------------------------------------------------------
# 2. NF4 quantization (reference; the format of bitsandbytes)
# ---------------------------------------------------------------------------------------
def _check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even int ≥ 2, got {blocksize!r}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (ceil(n/2),), absmax float32 (ceil(n/blocksize),)) for any float w."""
    check_float("w", w, (torch.float16, torch.bfloat16, torch.float32))
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise ValueError("w is empty: nothing to quantize")
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)                    # (n // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:                                                # the short last block divides
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))                          # the pad nibble is the code of 0
    code = _code("nf4", w.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # ties -> lower code
    packed = (q[0::2] << 4) | q[1::2]                           # (ceil(n/2),), first element high
    return packed, absmax


def _check_packed(packed, absmax, shape, blocksize) -> int:
    _check_blocksize(blocksize)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor (two 4-bit codes a byte)")
    check_float("absmax", absmax, (torch.float32,))
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise ValueError(f"shape {tuple(shape)} needs {(n + 1) // 2} packed bytes and {-(-n // blocksize)} "
                         f"absmax values at blocksize {blocksize}; got {packed.numel()} and {absmax.numel()}")
    check_same_device(packed=packed, absmax=absmax)
    return n


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32, backend: str = "torch") -> torch.Tensor:
    """ŵ = NF4[q] · absmax (fp32 product, then rounded to dtype), of the given shape."""
    shape = tuple(shape)
    n = _check_packed(packed, absmax, shape, blocksize)
    backend = resolve_backend(backend, packed)
    packed, absmax = packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous()
    if backend == "triton":
        return nf4_triton.dequantize_triton(packed, absmax, _code("nf4", packed.device), n, blocksize,
                                            dtype).view(shape)
    q = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()  # (n,) codes
    vals = _code("nf4", packed.device)[q]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    out[full:] = vals[full:] * absmax[-1]
    return out.to(dtype).view(shape)


# ---------------------------------------------------------------------------------------
# 3. Double quantization of the absmax values
# ---------------------------------------------------------------------------------------
_LUT_SIZE = 65536
_LUTS: dict = {}


def _nearest_lut(code: torch.Tensor) -> torch.Tensor:
    """table[i] = index of the first code whose upper midpoint is ≥ −1 + 2i/65535 (fp32)."""
    key = code.device
    if key not in _LUTS:
        mids = 0.5 * (code[:-1] + code[1:])                     # (255,)
        grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1)
        _LUTS[key] = torch.searchsorted(mids, grid).to(torch.uint8)  # = #midpoints strictly below
    return _LUTS[key]


def quantize_absmax(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 like absmax, scales float32 (ceil(len/blocksize),), offset float32 ()).
    offset = mean(absmax); codes quantize absmax − offset with the 8-bit dynamic type."""
    check_float("absmax", absmax, (torch.float32,))
    _check_blocksize(blocksize)
    if absmax.numel() == 0:
        raise ValueError("absmax is empty")
    offset = absmax.mean()
    v = (absmax - offset).reshape(-1)
    n = v.numel()
    pad = -n % blocksize
    blocks = F.pad(v, (0, pad)).view(-1, blocksize)             # (blocks, blocksize); pad is 0
    scales = blocks.abs().amax(dim=1)
    inv = torch.where(scales == 0, 0.0, 1.0 / scales)           # a zero block (one absmax) has no scale
    t = (blocks * inv[:, None]).clamp(-1, 1)                    # fp32, as bitsandbytes
    idx = (((t + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).long()    # trunc (all ≥ 0)
    codes = _nearest_lut(_code("dynamic", absmax.device))[idx]
    codes = torch.where(scales[:, None] == 0, torch.zeros_like(codes), codes)  # zero block: codes 0
    return codes.reshape(-1)[:n].view(absmax.shape), scales, offset


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    """absmax ≈ DYN[codes] · scale_of_block + offset, float32."""
    n = codes.numel()
    vals = _code("dynamic", codes.device)[codes.reshape(-1).long()]
    block_scale = scales.repeat_interleave(blocksize)[:n]
    return (vals * block_scale + offset).view(codes.shape)


def nf4_bits_per_param(blocksize: int = 64, blocksize2: int = 256, double: bool = True) -> float:
    """Storage bits a weight: 4 + 32/blocksize, or with double quantization
    4 + 8/blocksize + 32/(blocksize·blocksize2) (the offset, one fp32, is negligible)."""
    if not double:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


# ---------------------------------------------------------------------------------------
# 4. Matmul with an NF4 weight: autograd function and API
# ---------------------------------------------------------------------------------------
class NF4MatmulFunction(torch.autograd.Function):
    """y = x · Wᵀ with W (N, K) in NF4, the Triton kernels: the forward dequantizes tiles of
    W in registers; the backward gives dx = dy · W the same way; W is frozen (no dW).

    The block scales come as `stats` and `absmax_of(*stats)`: the fp32 absmax itself
    (absmax_of = identity), or double quantization's 8-bit codes, scales and offset
    (absmax_of = dequantize_absmax). Only the stored tensors are saved for backward, and the
    absmax (n/64 values) is recomputed there: saving the fp32 absmax a double-quantized layer
    builds would hold 0.5 bits a parameter from each layer's forward to its backward — for a
    7B model without activation checkpointing, 0.4 GB that QLoRA's double quantization exists
    to save."""

    @staticmethod
    def forward(ctx, x, packed, shape, blocksize, absmax_of, *stats):
        n, k = shape
        x2 = x.reshape(-1, k).contiguous()                      # (M, K)
        absmax, code = absmax_of(*stats), _code("nf4", x.device)
        if fused_path(x2.shape[0]):
            y = nf4_triton.matmul_fwd_triton(x2, packed, absmax, code, n, blocksize)
        else:
            y = F.linear(x2, nf4_triton.dequantize_triton(packed, absmax, code, n * k, blocksize, x.dtype).view(n, k))
        ctx.save_for_backward(packed, *stats)
        ctx.shape, ctx.blocksize, ctx.x_shape, ctx.absmax_of = shape, blocksize, x.shape, absmax_of
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        packed, *stats = ctx.saved_tensors
        n, k = ctx.shape
        dy2 = dy.reshape(-1, n).contiguous()                    # (M, N)
        absmax, code = ctx.absmax_of(*stats), _code("nf4", dy.device)
        if fused_path(dy2.shape[0]):
            dx = nf4_triton.matmul_bwd_triton(dy2, packed, absmax, code, k, ctx.blocksize)
        else:
            dx = dy2 @ nf4_triton.dequantize_triton(packed, absmax, code, n * k, ctx.blocksize, dy.dtype).view(n, k)
        return (dx.view(ctx.x_shape), None, None, None, None, *[None] * len(stats))


def _check_x(x: torch.Tensor, shape) -> tuple[int, int]:
    check_float("x", x, (torch.float16, torch.bfloat16, torch.float32))
    shape = tuple(shape)
    if len(shape) != 2 or x.dim() == 0 or x.shape[-1] != shape[1]:
        raise ValueError(f"x's last dim must equal K of the weight shape (N, K); x {tuple(x.shape)}, W {shape}")
    return shape


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
               backend: str = "auto") -> torch.Tensor:
    """y = x · Wᵀ for x (..., K) and the NF4 weight W of shape (N, K); y (..., N) in x's dtype.
    Gradient flows to x only."""
    shape = _check_x(x, shape)
    _check_packed(packed, absmax, shape, blocksize)
    check_same_device(x=x, packed=packed, absmax=absmax)
    packed, absmax = packed.reshape(-1).contiguous(), absmax.reshape(-1).contiguous()
    if resolve_backend(backend, x) == "torch":
        return F.linear(x, dequantize_nf4(packed, absmax, shape, blocksize, x.dtype))
    return NF4MatmulFunction.apply(x, packed, shape, blocksize, _identity, absmax)


def nf4_matmul_dq(x: torch.Tensor, packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_scales: torch.Tensor,
                  absmax_offset: torch.Tensor, shape, blocksize: int = 64, blocksize2: int = 256,
                  backend: str = "auto") -> torch.Tensor:
    """nf4_matmul with double-quantized block scales (the 8-bit codes, fp32 scales and offset
    of `quantize_absmax`): the fp32 absmax is rebuilt in the forward and again in the
    backward, never kept between them."""
    def absmax_of(codes, scales, offset):
        return dequantize_absmax(codes, scales, offset, blocksize2)

    if resolve_backend(backend, x) == "torch":
        return nf4_matmul(x, packed, absmax_of(absmax_codes, absmax_scales, absmax_offset), shape, blocksize, "torch")
    shape = _check_x(x, shape)
    if absmax_codes.dtype != torch.uint8:
        raise TypeError(f"absmax_codes must be uint8 (double quantization's 8-bit codes), got {absmax_codes.dtype}")
    _check_packed(packed, torch.empty(absmax_codes.numel(), device=packed.device), shape, blocksize)
    check_same_device(x=x, packed=packed, absmax_codes=absmax_codes, absmax_scales=absmax_scales)
    return NF4MatmulFunction.apply(x, packed.reshape(-1).contiguous(), shape, blocksize, absmax_of,
                                   absmax_codes, absmax_scales.float(), absmax_offset.float())


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4: y = x · Wᵀ + b, W dequantized on the fly.
    Buffers: `packed`, `absmax` (not parameters: the optimizer never sees them); bias (if
    any) is a parameter in the compute dtype. Inputs are cast to the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 compute_dtype: torch.dtype = torch.bfloat16, backend: str = "auto", device=None):
        super().__init__()
        _check_blocksize(blocksize)
        n = in_features * out_features
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.compute_dtype, self.backend = blocksize, compute_dtype, backend
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(-(-n // blocksize), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                    backend: str = "auto") -> "NF4Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, compute_dtype,
                backend, device=linear.weight.device)
        packed, absmax = quantize_nf4(linear.weight.detach(), blocksize)
        m.packed.copy_(packed)
        m.absmax.copy_(absmax)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach().to(compute_dtype))
        return m

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                              dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nf4_matmul(x.to(self.compute_dtype), self.packed, self.absmax, (self.out_features, self.in_features),
                       self.blocksize, self.backend)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------------------
# 5. Cost model
# ---------------------------------------------------------------------------------------
def flops(M: int, N: int, K: int) -> int:
    """y = x · Wᵀ, (M, K) · (K, N): 2·M·N·K (a multiply and an add each). Dequantizing costs
    one multiply a weight (N·K) once per use in the unfused path; in the fused kernel every
    row tile of x re-dequantizes W, ceil(M / BLOCK_M)·N·K multiplies, negligible next to the
    matmul unless M is tiny."""
    return 2 * M * N * K


def bytes_moved(M: int, N: int, K: int, *, dtype_bytes: int = 2, blocksize: int = 64, fused: bool = True) -> int:
    """Minimum HBM traffic of the forward, in bytes (x, y in dtype_bytes; absmax fp32):

    fused      read x (M·K·d), W as 0.5 byte a weight + 4 bytes a block, write y (M·N·d)
    unfused    dequantize: read the same W bytes, write W (N·K·d); then F.linear reads W
               (N·K·d), x, and writes y: 2·N·K·d more.
    Per weight at blocksize 64: 0.5625 bytes fused against 4.5625 unfused in bf16, so when
    M is small (decode, a few tokens) and W dominates, the fused kernel moves ~8× fewer bytes."""
    w_q = (N * K + 1) // 2 + 4 * (-(-N * K // blocksize))
    io = (M * K + M * N) * dtype_bytes
    return io + w_q + (0 if fused else 2 * N * K * dtype_bytes)


# Hardware constants of the dispatch (H100 SXM, bf16 dense; see the module docstring)
PEAK_FLOPS = 989e12
BANDWIDTH = 3.35e12
FUSED_EFFICIENCY = 0.35     # e_f: issue-bound ceiling of the fused kernel's prefill tile, sm_90a SASS
CUBLAS_EFFICIENCY = 0.75    # e_c


def crossover_m(e_fused: float = FUSED_EFFICIENCY, e_cublas: float = CUBLAS_EFFICIENCY, *,
                peak_flops: float = PEAK_FLOPS, bandwidth: float = BANDWIDTH, dtype_bytes: int = 2,
                blocksize: int = 64) -> float:
    """M* = (q + d)·P / (2·BW·(1/e_f − 1/e_c)), q = 0.5 + 4/blocksize bytes a stored weight:
    the M above which dequantize + cuBLAS beats the fused kernel (module docstring). Infinite
    when the fused kernel is as efficient as cuBLAS."""
    gap = 1 / e_fused - 1 / e_cublas
    extra = 0.5 + 4 / blocksize + dtype_bytes                   # unfused dequantize pass, bytes a weight
    return math.inf if gap <= 0 else extra * peak_flops / (2 * bandwidth * gap)


FUSED_MAX_M = 256  # crossover_m() ≈ 250 with the constants above, rounded to a tile multiple


def fused_path(m: int) -> bool:
    """The triton backend's choice for x with m rows: the fused kernel (True) or dequantize +
    cuBLAS (False)."""
    return m <= FUSED_MAX_M
