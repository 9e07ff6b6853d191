"""Instruction data too large to load: one JSONL file read row by row, shuffled through a
bounded buffer, split deterministically, with a position a checkpoint can store.

    stream = JsonlStream("big.jsonl", split="train", seed=0, buffer=4096)
    batches = StreamBatches(stream, row_encoder(tok, max_len=512), batch_size=16, pad_id=tok.eot_id)
    x, y = next(batches)
    state = batches.state_dict()       # small: a byte offset, the buffer's row offsets, the RNG
    ...; batches.load_state_dict(state) # the same batches from there on, in a new process

Memory is O(buffer) whatever the file's size: nothing is indexed, each epoch is one sequential
pass. The shuffle is the buffered one of tf.data / torchdata: fill the buffer with the next rows
of the split, yield a uniformly drawn one, refill (each epoch's generator seeded with (seed,
epoch)). Rows far apart in the file stay apart (a row leaves at most ~buffer · ln(n) rows after it
entered), so a file sorted by topic should be shuffled once offline; what this gives is
determinism and resumability at any size.

The split. A row is in val when a hash of its context — the instruction and input of an Alpaca
row, every message but the last of a chat row — read as a number in [0, 1), is below
val_fraction (ltk/training/data.py splits documents the same way). It depends on the row alone:
no pass over the file, the same rows whatever else the file holds, and rows that share a
context (the same question answered twice) on one side, as `instruct.split` keeps them. The val
side is read once, in file order, capped at `val_rows`.

The resume position (state_dict) is taken between rows: the epoch, the byte offset and line of
the next row to read, the byte offsets of the rows in the buffer (re-read on load: the buffer's
text is not stored) and the generator's state.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ltk.training.instruct import _alpaca_row, _chat_row, _pad_batch, encode_example

Encoded = tuple[list[int], list[int]]


def context_key(row: dict) -> str:
    """What decides a row's split: its prompt side (the answer is not part of it)."""
    if "messages" in row and isinstance(row["messages"], list):
        return json.dumps(row["messages"][:-1], sort_keys=True, ensure_ascii=False)
    return json.dumps([row.get("instruction"), row.get("input", "")], ensure_ascii=False)


def in_val(row: dict, val_fraction: float) -> bool:
    digest = hashlib.blake2b(context_key(row).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def parse_row(line: bytes, where: str) -> dict:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return row


class JsonlStream:
    """The rows (dict, 'file, line N') of one split of a JSONL file, epoch after epoch (see the
    module docstring); epochs=None repeats forever, shuffle=False keeps the file order."""

    def __init__(self, path: str | Path, *, split: str = "train", val_fraction: float = 0.1, seed: int = 0,
                 buffer: int = 1024, shuffle: bool = True, epochs: int | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"instruction data not found: {self.path}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        if not 0 <= val_fraction < 1 or buffer < 1:
            raise ValueError(f"val_fraction must be in [0, 1) and buffer >= 1, got {val_fraction} and {buffer}")
        self.split, self.val_fraction, self.seed, self.epochs = split, val_fraction, seed, epochs
        self.size = buffer if shuffle else 1
        self.shuffle = shuffle
        self._file = self.path.open("rb")
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.offset, self.lineno, self.rows_this_epoch = epoch, 0, 0, 0
        self.buffer: list[tuple[int, int, bytes]] = []  # (byte offset, line number, the line)
        self.rng = np.random.default_rng([self.seed, epoch])

    def _wanted(self, row: dict) -> bool:
        return self.split == "all" or in_val(row, self.val_fraction) == (self.split == "val")

    def _fill(self) -> bool:
        """Read rows of the split into the buffer until it is full; False at the end of the file."""
        self._file.seek(self.offset)
        while len(self.buffer) < self.size:
            line = self._file.readline()
            if not line:
                return False
            at, self.offset, self.lineno = self.offset, self.offset + len(line), self.lineno + 1
            if line.strip() and self._wanted(parse_row(line, self._where(self.lineno))):
                self.buffer.append((at, self.lineno, line))
        return True

    def _where(self, lineno: int) -> str:
        return f"{self.path}, line {lineno}"

    def __iter__(self) -> Iterator[tuple[dict, str]]:
        return self

    def __next__(self) -> tuple[dict, str]:
        while True:
            self._fill()
            if self.buffer:
                j = int(self.rng.integers(len(self.buffer))) if self.shuffle else 0
                _, lineno, line = self.buffer[j]
                self.buffer[j] = self.buffer[-1]  # O(1) removal; the order is the generator's anyway
                self.buffer.pop()
                self.rows_this_epoch += 1
                return parse_row(line, self._where(lineno)), self._where(lineno)
            if self.rows_this_epoch == 0:
                raise ValueError(f"{self.path}: no rows in the {self.split} split (val_fraction {self.val_fraction})")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self._start_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The position between two rows: JSON-serializable, a few numbers per buffered row."""
        return {"epoch": self.epoch, "offset": self.offset, "lineno": self.lineno, "rows": self.rows_this_epoch,
                "buffer": [[at, n] for at, n, _ in self.buffer], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_epoch(state["epoch"])
        self.offset, self.lineno, self.rows_this_epoch = state["offset"], state["lineno"], state["rows"]
        self.rng.bit_generator.state = state["rng"]
        for at, n in state["buffer"]:
            self._file.seek(at)
            self.buffer.append((at, n, self._file.readline()))

    def close(self) -> None:
        self._file.close()


def row_encoder(tok, max_len: int, template=None) -> Callable[[dict, str], Encoded]:
    """row -> (input_ids, labels). Without a template: the Alpaca / '### Role:' rendering with the
    loss on the final answer (ltk/training/instruct.py). With one (ltk/training/chat_template.py):
    chat rows through it, every assistant turn learned; an Alpaca row becomes a user message
    (instruction, blank line, input) and an assistant one."""
    def encode(row: dict, where: str) -> Encoded:
        try:
            if template is None:
                ex = _chat_row(row, where) if "messages" in row else _alpaca_row(row, where)
                return encode_example(tok, ex, max_len)
            messages = row["messages"] if "messages" in row else _alpaca_messages(row, where)
            return template.encode(tok, messages, max_len)
        except ValueError as e:
            raise ValueError(e.args[0] if str(e).startswith(where) else f"{where}: {e}") from None
    return encode


def _alpaca_messages(row: dict, where: str) -> list[dict]:
    _alpaca_row(row, where)  # the same checks of the fields
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


class StreamBatches:
    """Batches of batch_size encoded rows of a JsonlStream: right-padded (x, y) as instruct.batches
    makes them, or packed (x, y, segments) into rows of max_len (ltk/training/packing.py). The
    position after each batch is the stream's (state_dict / load_state_dict)."""

    def __init__(self, stream: JsonlStream, encode: Callable[[dict, str], Encoded], batch_size: int, pad_id: int,
                 *, packing: bool = False, max_len: int = 0):
        if batch_size < 1 or (packing and max_len < 2):
            raise ValueError(f"batch_size must be >= 1 (and max_len >= 2 to pack), got {batch_size}, {max_len}")
        self.stream, self.encode, self.batch_size, self.pad_id = stream, encode, batch_size, pad_id
        self.packing, self.max_len = packing, max_len

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for row, where in self.stream:
            rows.append(self.encode(row, where))
            if len(rows) == self.batch_size:
                break
        if not rows:
            raise StopIteration
        if self.packing:
            from ltk.training.packing import pack_batch

            return pack_batch(rows, self.max_len, self.pad_id)
        return _pad_batch(rows, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def read_split(path, encode, split: str, *, val_fraction: float, seed: int, limit: int | None = None) -> list:
    """Every encoded row of one split in file order (at most `limit`): the val side of a stream,
    or, without --stream, a split small enough to hold."""
    stream = JsonlStream(path, split=split, val_fraction=val_fraction, seed=seed, shuffle=False, epochs=1)
    try:
        out = []
        for row, where in stream:
            out.append(encode(row, where))
            if limit is not None and len(out) >= limit:
                break
        return out
    finally:
        stream.close()


def read_val(path, encode, *, val_fraction: float, seed: int, limit: int) -> list:
    """The val rows of a JSONL file, encoded once (at most `limit`): what a fine-tuning run scores."""
    val = read_split(path, encode, "val", val_fraction=val_fraction, seed=seed, limit=limit)
    if not val:
        raise ValueError(f"{path}: no row falls in the val split at val_fraction {val_fraction} (rows are "
                         "assigned by a hash of their prompt): add rows or raise the fraction")
    return val
