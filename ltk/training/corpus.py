"""Where documents come from: the embedded corpus, text files and folders, JSONL, Parquet.

A *document* is one unit of text that is read as a whole: one source file, one JSONL line,
one Parquet row. Everything downstream works on whole documents: cleaning keeps or drops
them, the train/val split assigns them, and the token stream puts an end-of-text token after
each one so the model learns where a text stops.

    DataConfig.source     documents
    -----------------     ---------
    "embedded"            the Python standard library's own .py files (nothing to download)
    some/file.txt         a single text file, cut at paragraph breaks (see pack_paragraphs)
    some/folder/          every file under it, recursively: a text file is one document,
                          a .jsonl or .parquet file (a dataset's shards) one per row
    some/rows.jsonl       one document per line, from the field `text_field` (.jsonl.gz too)
    some/rows.parquet     one document per row, from the column `text_field` (needs pyarrow)

Bytes are decoded as UTF-8. Invalid bytes are not fatal, because real text collections
contain them, but they are not silent either: each bad sequence becomes U+FFFD, the number of
replacements goes into SourceStats, and one warning says how many and where the first was.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ltk.training.progress import progress

if TYPE_CHECKING:
    from ltk.training.config import DataConfig

EMBEDDED = "embedded"

# Parts of the standard library that are not hand-written library code: tests (their data
# files are deliberately odd), vendored or installed packages, build products, and generated
# tables (codec charmaps, pydoc's topic dump, the sysconfig data module).
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "lib2to3", "pydoc_data", "encodings", "lib-dynload", "__phello__", "_bundled",
})
_SKIP_FILE_PREFIXES = ("_sysconfigdata", "test_")
_SKIP_FILES = frozenset({"this.py"})  # the Zen of Python, stored rot13-scrambled

DOC_CHARS = 4096  # a single text file is cut into documents of about this many characters
_SNIFF_BYTES = 8192  # a NUL byte within the first 8 KiB marks a file as binary (as git does)
_BLANK_LINES = re.compile(r"(\n\s*\n)")  # one or more blank lines: a paragraph break


class SourceWarning(UserWarning):
    """The source was readable but not clean (invalid UTF-8, unusable JSONL lines)."""


@dataclass
class SourceStats:
    """What load_documents read; stored in the prepared dataset's meta.json."""

    description: str
    documents: int = 0
    files: int = 0  # files that contributed text
    bytes_read: int = 0  # file bytes for text and JSONL; text bytes for (compressed) Parquet
    invalid_utf8_replacements: int = 0  # U+FFFD characters put in place of invalid bytes
    first_invalid_utf8: str | None = None  # "path" or "path:line" of the first one
    skipped_binary_files: int = 0  # files under a folder with NUL bytes
    skipped_records: int = 0  # JSONL lines / Parquet rows without a usable text field
    first_skipped_record: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_documents(cfg: DataConfig) -> tuple[list[str], SourceStats]:
    """Read the documents of `cfg.source`, in a deterministic order."""
    if cfg.source == EMBEDDED:
        docs, stats = _load_embedded(cfg.max_bytes)
    else:
        path = _existing_path(cfg.source)
        kind = source_kind(path)
        stats = SourceStats(description=f"{kind} {path}")
        if kind == "folder":
            docs = _load_folder(path, cfg.text_field, stats)
        elif kind == "text":
            docs = _load_text_file(path, stats)
        else:
            docs = _ROW_READERS[kind](path, cfg.text_field, stats)
            stats.files = 1
    stats.documents = len(docs)
    _warn_if_unclean(stats)
    return docs, stats


def source_kind(path: Path) -> str:
    """'folder', 'jsonl', 'parquet' or 'text', decided by what the path is and its suffix."""
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def source_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """Everything about the source that decides which documents load_documents returns.

    Built from file names, sizes and modification times only (no reading), so checking a
    prepared dataset's cache key costs milliseconds even for a large corpus.
    """
    if cfg.source == EMBEDDED:
        root = _stdlib_root()
        files = embedded_files(cfg.max_bytes)
        return {"source": EMBEDDED, "python": sys.version, "max_bytes": cfg.max_bytes,
                "files": _stat_list(files, root)}
    path = _existing_path(cfg.source).resolve()
    kind = source_kind(path)
    fingerprint: dict[str, Any] = {"source": str(path), "kind": kind}
    if kind != "text":  # row files, alone or in a folder, read the field `text_field`
        fingerprint["text_field"] = cfg.text_field
    files = _folder_files(path) if kind == "folder" else [path]
    fingerprint["files"] = _stat_list(files, path if kind == "folder" else path.parent)
    return fingerprint


# ----------------------------------------------------------------------------------------
# The embedded corpus: the standard library's sources
# ----------------------------------------------------------------------------------------

def embedded_files(max_bytes: int) -> list[Path]:
    """The stdlib .py files that make up the embedded corpus, at most `max_bytes` in total.

    Which files exist depends on the Python version, so the corpus (and any tokenizer or
    model trained on it) does too; the version is part of the dataset's cache key.

    Sorted paths are a poor sample: a prefix of them is all `__future__` to `distutils`.
    Instead the candidates are ordered by a hash of their relative path, a fixed shuffle that
    is the same on every machine, and taken greedily while they fit under the cap, so even a
    small cap draws files from all over the library (asyncio, email, json, xml, ...).
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive for the embedded corpus, got {max_bytes}")
    root = _stdlib_root()
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if _keep_stdlib_dir(d))
        for name in sorted(filenames):
            if name.endswith(".py") and name not in _SKIP_FILES and not name.startswith(_SKIP_FILE_PREFIXES):
                path = Path(dirpath) / name
                candidates.append((_stable_hash(path.relative_to(root).as_posix()), path))
    if not candidates:
        raise ValueError(f"no standard library sources found under {root}; use a text source instead")
    chosen, total = [], 0
    for _, path in sorted(candidates):
        size = path.stat().st_size
        if total + size <= max_bytes:
            chosen.append(path)
            total += size
    return sorted(chosen)


def _load_embedded(max_bytes: int) -> tuple[list[str], SourceStats]:
    files = embedded_files(max_bytes)
    version = ".".join(map(str, sys.version_info[:3]))
    stats = SourceStats(description=f"embedded: {len(files)} standard library .py files of Python {version}")
    docs = [_decode(path.read_bytes(), str(path), stats)
            for path in progress(files, desc="data: reading the standard library", unit="file")]
    stats.files = len(files)
    return docs, stats


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _keep_stdlib_dir(name: str) -> bool:
    return name not in _SKIP_DIRS and not name.startswith((".", "config-"))


def _stable_hash(text: str) -> bytes:
    """A hash that, unlike hash(), is the same in every process and on every machine."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


# ----------------------------------------------------------------------------------------
# Text files and folders
# ----------------------------------------------------------------------------------------

def pack_paragraphs(text: str, target_chars: int = DOC_CHARS) -> list[str]:
    """Cut one long text into documents of about `target_chars`, only at paragraph breaks.

    A single file (a novel, a log, a dump) is one text to its author but far too long to be
    one document here: the split into train and validation works on whole documents, so it
    needs many of them. Paragraphs (runs separated by blank lines) are packed in order until
    a document reaches the target; a paragraph is never cut, so one longer than the target
    becomes a document of its own. A text shorter than the target stays one document.
    """
    parts = _BLANK_LINES.split(text)  # [paragraph, break, paragraph, break, ..., paragraph]
    docs, current = [], ""
    for i in range(0, len(parts), 2):
        current += parts[i]
        if len(current) >= target_chars:
            docs.append(current)
            current = ""
        elif i + 1 < len(parts):
            current += parts[i + 1]
    if current.strip():
        docs.append(current)
    return docs


def _load_text_file(path: Path, stats: SourceStats) -> list[str]:
    raw = path.read_bytes()
    if b"\0" in raw[:_SNIFF_BYTES]:
        raise ValueError(f"{path} looks binary (it contains NUL bytes); expected a text file, "
                         "a folder, .jsonl or .parquet")
    stats.files = 1
    return pack_paragraphs(_decode(raw, str(path), stats))


def _load_folder(root: Path, field: str, stats: SourceStats) -> list[str]:
    files = _folder_files(root)
    docs = []
    for path in progress(files, desc=f"data: reading {root.name}", unit="file"):
        kind = source_kind(path)
        if kind in _ROW_READERS:
            docs += _ROW_READERS[kind](path, field, stats)
            stats.files += 1
            continue
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            if b"\0" in head:
                stats.skipped_binary_files += 1
                continue
            raw = head + f.read()
        stats.files += 1
        docs.append(_decode(raw, str(path), stats))
    if not any(doc.strip() for doc in docs):
        raise ValueError(f"no usable text in folder {root}: {len(files)} visible files, "
                         f"{stats.skipped_binary_files} of them binary, the rest empty")
    return docs


def _folder_files(root: Path) -> list[Path]:
    """Every non-hidden file under `root`, in a fixed order (walk with sorted names)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / name for name in sorted(filenames) if not name.startswith(".")]
    return out


# ----------------------------------------------------------------------------------------
# Row formats: JSONL and Parquet
# ----------------------------------------------------------------------------------------

def _read_jsonl(path: Path, field: str, stats: SourceStats) -> list[str]:
    """One document per line. Lines that are not JSON objects with a string `field` are
    skipped and counted (a few broken rows should not sink a large file); a file where no
    line has the field is an error, since that is a wrong `text_field`, not noise."""
    docs = []
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(_decode(raw, where, stats))
            except json.JSONDecodeError as e:
                _skip_record(stats, where, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                _skip_record(stats, where, f"a JSON {type(row).__name__}, not an object")
            elif field not in row:
                _skip_record(stats, where, f"no field {field!r} (it has {sorted(row)[:8]})")
            elif not isinstance(row[field], str):
                _skip_record(stats, where, f"field {field!r} is {type(row[field]).__name__}, not a string")
            else:
                docs.append(row[field])
    if not docs:
        raise ValueError(f"no documents in {path}: no line has a string field {field!r} "
                         f"(first problem: {stats.first_skipped_record}); set --data.text_field")
    return docs


def _read_parquet(path: Path, field: str, stats: SourceStats) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    if field not in columns:
        raise ValueError(f"{path} has no column {field!r}; its columns are {columns}; set --data.text_field")
    docs, row = [], 0
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                docs.append(value)
                stats.bytes_read += len(value.encode("utf-8"))
            else:
                _skip_record(stats, f"{path} row {row}", f"{type(value).__name__}, not a string")
    if not docs:
        raise ValueError(f"no documents in {path}: column {field!r} holds no strings")
    return docs


_ROW_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet}


def _skip_record(stats: SourceStats, where: str, problem: str) -> None:
    stats.skipped_records += 1
    if stats.first_skipped_record is None:
        stats.first_skipped_record = f"{where}: {problem}"


# ----------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------

def _decode(raw: bytes, where: str, stats: SourceStats) -> str:
    """UTF-8 bytes to text; invalid sequences become U+FFFD and are counted.

    A leading byte-order mark is an encoding artifact, not text, so "utf-8-sig" drops it.
    """
    stats.bytes_read += len(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
    # A U+FFFD that was already in the input (as the valid bytes EF BF BD) is not damage.
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
    stats.invalid_utf8_replacements += replaced
    if stats.first_invalid_utf8 is None:
        stats.first_invalid_utf8 = where
    return text


def _warn_if_unclean(stats: SourceStats) -> None:
    """One warning per load for each kind of problem, however many files had it."""
    if stats.invalid_utf8_replacements:
        warnings.warn(f"{stats.invalid_utf8_replacements} invalid UTF-8 sequence(s) replaced by U+FFFD "
                      f"(first in {stats.first_invalid_utf8})", SourceWarning, stacklevel=3)
    if stats.skipped_records:
        warnings.warn(f"skipped {stats.skipped_records} record(s) without usable text "
                      f"(first: {stats.first_skipped_record})", SourceWarning, stacklevel=3)


def _existing_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {source} (expected 'embedded', a text file, "
                                "a folder, a .jsonl or a .parquet file)")
    return path


def _stat_list(files: list[Path], base: Path) -> list[list[Any]]:
    out = []
    for path in files:
        st = path.stat()
        out.append([path.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns])
    return out
