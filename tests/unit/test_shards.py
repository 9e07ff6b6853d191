"""Token shards: header round trip, dtype choice, and every way a file can be bad."""
import struct

import numpy as np
import pytest

from ltk.training.shards import HEADER_BYTES, MAGIC, read_header, read_shard, token_dtype, write_shard


def test_round_trip_uint16(tmp_path):
    tokens = np.array([0, 1, 299, 7, 42], dtype=np.int64)
    path = write_shard(tmp_path / "a.bin", tokens, vocab_size=300)
    out = read_shard(path)
    assert out.dtype == np.uint16 and isinstance(out, np.memmap)
    np.testing.assert_array_equal(out, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    assert tuple(read_header(path)) == (1, 2, 5, 300)


def test_round_trip_uint32_for_large_vocab(tmp_path):
    tokens = np.array([0, 65535, 65536, 128255], dtype=np.int64)
    out = read_shard(write_shard(tmp_path / "a.bin", tokens, vocab_size=128256))
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, tokens)


def test_dtype_boundary():
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_header_layout_is_little_endian(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(3), vocab_size=10)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    assert struct.unpack("<IIQQ", raw[8:32]) == (1, 2, 3, 10)
    assert raw[32:] == b"\x00\x00\x01\x00\x02\x00"


def test_memmap_is_read_only(tmp_path):
    out = read_shard(write_shard(tmp_path / "a.bin", np.arange(4), vocab_size=10))
    with pytest.raises(ValueError):
        out[0] = 1


def test_empty_shard(tmp_path):
    assert len(read_shard(write_shard(tmp_path / "a.bin", np.zeros(0, np.int64), vocab_size=10))) == 0


def test_bad_magic(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"NOTASHARD" + bytes(40))
    with pytest.raises(ValueError, match="not a token shard"):
        read_shard(path)
    path.write_bytes(b"tiny")
    with pytest.raises(ValueError, match="not a token shard"):
        read_shard(path)


def test_truncated_and_overlong(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(100), vocab_size=1000)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated: header says 100 tokens"):
        read_shard(path)
    path.write_bytes(raw + b"\x00\x00")
    with pytest.raises(ValueError, match="unexpected bytes"):
        read_shard(path)


def test_unknown_version(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(3), vocab_size=10)
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 7)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="version 7"):
        read_shard(path)


def test_out_of_range_tokens_rejected_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        write_shard(tmp_path / "a.bin", np.array([3, 10]), vocab_size=10)
    with pytest.raises(ValueError, match="1-D integer"):
        write_shard(tmp_path / "a.bin", np.array([0.5]), vocab_size=10)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_whole_file(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, np.arange(50), vocab_size=100)
    write_shard(path, np.arange(5), vocab_size=100)
    np.testing.assert_array_equal(read_shard(path), np.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary files left
