"""Token shards: a tokenized stream on disk, read back by memory-mapping.

Why a file of raw integers and not, say, pickled lists or Arrow? Training reads random
windows of a few thousand consecutive tokens, millions of times. A flat array on disk can be
memory-mapped: opening it costs nothing whatever its size, a window is a slice, and the
operating system's page cache shares the pages between all processes of a multi-GPU run.

Layout (all integers little-endian), 32 bytes of header, then the tokens:

    offset  size  field
    0       8     magic         b"LTKTOKS\\0"   (what the file is)
    8       4     version       uint32, FORMAT_VERSION
    12      4     item size     uint32, bytes per token: 2 (uint16) or 4 (uint32)
    16      8     token count   uint64
    24      8     vocab size    uint64, tokens are < this
    32      ...   tokens        token count x item size bytes

uint16 halves the disk and page-cache footprint whenever the vocabulary fits (<= 65536
ids, e.g. GPT-2's 50257); larger vocabularies (Llama 3: 128256) need uint32. The header
is 32 bytes so the token array starts aligned for either width.
"""
from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAGIC = b"LTKTOKS\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, item size, token count, vocab size
HEADER_BYTES = _HEADER.size  # 32
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardHeader(NamedTuple):
    version: int
    itemsize: int
    num_tokens: int
    vocab_size: int


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token type that holds every id below `vocab_size`."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in 1..2**32, got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write `tokens` (1-D integers, each < vocab_size) as a shard, atomically.

    The data goes to a temporary file in the same folder, which is then renamed over
    `path`: a reader, or a crash halfway, never sees a partly written shard under the name.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    dtype = token_dtype(vocab_size)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); found {tokens.min()}..{tokens.max()}")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, tokens.size, vocab_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(tokens.astype(dtype, copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | Path) -> ShardHeader:
    """Read and check a shard's header (not its tokens); raises ValueError if it is bad."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise ValueError(f"{path} is not a token shard (its first bytes are not {MAGIC!r})")
    _, version, itemsize, count, vocab_size = _HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: token shard format version {version} is not supported "
                         f"(this code reads version {FORMAT_VERSION}); prepare the data again")
    if itemsize not in _DTYPES:
        raise ValueError(f"{path}: token shard has item size {itemsize}; expected 2 or 4 bytes")
    expected = HEADER_BYTES + count * itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise ValueError(f"{path}: token shard is truncated: header says {count} tokens "
                         f"({expected} bytes) but the file has {actual} bytes")
    if actual > expected:
        raise ValueError(f"{path}: token shard has {actual - expected} unexpected bytes after its {count} tokens")
    return ShardHeader(version, itemsize, count, vocab_size)


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (uint16 or uint32), header checked."""
    header = read_header(path)
    dtype = _DTYPES[header.itemsize]
    if header.num_tokens == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))
