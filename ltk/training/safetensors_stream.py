"""Write a .safetensors file one tensor at a time, so no more than one tensor (one box of a
shard, or one converted weight) is ever copied in memory.

The format (github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
length n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}, padded with spaces to a multiple of 8, then the raw little-endian
bytes of every tensor, back to back, at the offsets the header gives. Since every name, dtype
and shape is known before any byte is written, the header goes first and the tensors follow,
each produced only when its turn comes.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_streamed(path: str | Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], Callable]],
                   metadata: dict[str, str] | None = None) -> int:
    """Write `path` from entries (name, dtype, shape, produce) where produce() returns the tensor
    (of that dtype and shape) when its bytes are due. Returns the file's size. fsynced."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in entries:
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors code")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in entries:
            t = produce()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset
