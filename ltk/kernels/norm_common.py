"""What LayerNorm and RMSNorm share (ltk/kernels/layernorm.py, ltk/kernels/rmsnorm.py): the
launch configuration of their row kernels, the size of the backward's persistent grid, the
input checks and the (..., N) -> (M, N) reshapes. The math and the kernels stay in each op's
file; this is the plumbing both launch them with.

Both ops hold a whole row in registers (BLOCK_N = next power of two ≥ N, up to MAX_WIDTH),
pack short rows ROWS to a program so a program handles about TILE elements, and run the
backward as a fixed grid of programs, each accumulating its share of dw (and db) in fp32
registers and writing one partial row that torch sums (deterministic, no atomics).
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch

from ltk.kernels.backend import check_float, check_same_device, resolve_backend

MAX_WIDTH = 65536      # widest row the triton backend holds in one block (the torch backend takes any)
TILE = 4096            # elements one program handles when rows are short (ROWS × BLOCK_N)
INTERPRETER_PROGRAMS = 4  # backward programs under the interpreter (programs run one after another)
# The backward holds a tile of up to ONE_PASS_TILE elements (ROWS × BLOCK_N) in registers: x and
# dy, live across the row reductions, beside w and the fp32 dw (db) accumulators. Wider rows are
# walked in CHUNK-wide pieces, read twice (the second time from the caches), with dw (db)
# accumulated in the program's row of the partial buffer instead of registers.
ONE_PASS_TILE = 8192
CHUNK = 4096


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(n_rows: int, n_cols: int, *, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for an (n_rows, n_cols) input.

    BLOCK_N covers the whole row; ROWS packs short rows so that a program handles ~TILE
    elements (never more rows than the input has). num_warps (GPU only; the interpreter
    ignores it) depends on the tile of ROWS × BLOCK_N elements:

    forward   one warp per 1024 elements, 4 to 32: a 16384-wide row gets 16 warps, each
              thread holding 32 values of x (~90-120 registers, no spills).
    backward  one pass (tiles up to ONE_PASS_TILE): x, dy, w and the fp32 dw (and db)
              accumulators stay in registers, 16 values of each a thread: 4 warps up to
              2048 elements, 8 at 4096, 16 at 8192 (~75-128 registers). Wider rows are
              walked in CHUNK-wide pieces: 8 warps, 16 values a thread again. No spills in
              any loop, any variant (fp16/bf16/fp32, fp32 weights, residual, widths 768 to
              65536); in a few fp32-weight or residual variants ptxas keeps 8-16 bytes a
              thread in local memory outside the loops, to stay at 64 or 80 registers.
    (Register counts from ptxas for sm_90 with Triton 3.9: retune on new hardware.)"""
    block_n = next_pow2(n_cols)
    rows = min(max(1, TILE // block_n), next_pow2(max(n_rows, 1)))
    tile = rows * block_n
    if not backward:
        num_warps = min(32, max(4, tile // 1024))
    elif tile <= 2048:
        num_warps = 4
    elif tile <= 4096:
        num_warps = 8
    elif tile <= ONE_PASS_TILE:
        num_warps = 16
    else:
        num_warps = CHUNK // 512  # the chunked walk: 16 values a thread
    return block_n, rows, num_warps


@lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_programs(n_rows: int, n_cols: int, device: torch.device) -> int:
    """How many programs the backward launches (= rows of the dw partial buffer).

    One per SM at least. More only where they can be resident together (registers
    permitting: up to 4 per SM for tiles of ≤ 2048 elements, 2 at 4096, 1 from 8192 on) and
    where each still gets ≥ 32 rows: the partials cost 8 bytes per column per program
    (written, then read by torch's sum), under ~4% of the 6 bytes per element of x, dy, dx
    (bf16) at 32 rows a program. Never more programs than row tiles, so that every partial
    row is written."""
    block_n, rows, _ = launch_config(n_rows, n_cols, backward=True)
    n_tiles = math.ceil(n_rows / rows)
    if device.type != "cuda":  # the interpreter runs programs one after another
        return max(1, min(n_tiles, INTERPRETER_PROGRAMS))
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    per_sm = max(1, min(4, 8192 // (rows * block_n)))
    return max(1, min(n_tiles, max(sms, min(per_sm * sms, math.ceil(n_rows / 32)))))


def on_device(t: torch.Tensor):
    """Launch on t's GPU, whichever one is current (a no-op on a CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_norm_inputs(x, residual, weight, bias, eps, backend: str) -> str:
    """Validate the arguments of a norm and return the concrete backend.

    x: (..., N) float; residual: x's shape, any float dtype (h = x + residual takes the
    promoted dtype, as torch's add does: a bf16 branch added to an fp32 residual stream gives
    an fp32 h, and y in fp32); weight (and bias): (N,), in the dtype of the normalized
    tensor or float32 (fp32 master weights with fp16/bf16 activations); bias has weight's
    dtype. float64 only on the torch backend."""
    check_float("x", x, _TORCH_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (..., N); got a 0-d tensor")
    backend = resolve_backend(backend, x)
    allowed = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    check_float("x", x, allowed)
    n, dtype = x.shape[-1], x.dtype
    if residual is not None:
        check_float("residual", residual, allowed)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}: they must match")
        dtype = torch.promote_types(x.dtype, residual.dtype)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        check_float(name, t, _TORCH_DTYPES)
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x's last dim; got {tuple(t.shape)}")
        if t.dtype not in (dtype, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; it must be that of the normalized tensor ({dtype}) "
                            "or torch.float32")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias has dtype {bias.dtype}, weight has {weight.dtype}: they must match")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number ≥ 0, got {eps!r}")
    if backend == "triton" and n > MAX_WIDTH:
        raise ValueError(f"x's last dim is {n}; the triton backend handles up to {MAX_WIDTH} (use backend='torch')")
    return backend


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., N) -> (M, N) contiguous (a view when possible, else a copy)."""
    return None if t is None else t.reshape(-1, t.shape[-1]).contiguous()


MODES = ("fwd", "bwd", "fwd+bwd")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
