"""The data pipeline: from a DataConfig to token shards on disk, built once and cached.

    load_documents      (corpus.py)     source -> documents
    clean_documents     (clean.py)      normalise; drop short and duplicate documents
    split_documents     (here)          train / val, by a hash of each document's text
    Tokenizer           (tokenizer.py)  trained on the train split only, or loaded
    encode + join                       doc_1 EOT doc_2 EOT ... doc_n EOT
    write_shard         (shards.py)     train_0000.bin ..., val_0000.bin ...

The result is a folder, `<cache>/data/<key>/`, holding the shards, tokenizer.json and
meta.json (every count, the config, the statistics of each step). `key` hashes everything
that decides the output: the relevant config fields, a fingerprint of the source (file names,
sizes, modification times; the Python version for the embedded corpus), the tokenizer file's
content and the pipeline's format version. Asking again returns the folder at once.

The folder is built under a temporary name and renamed into place: a rename is atomic, so an
interrupted build leaves no half dataset, and two processes that build the same one at the
same time (every rank of a multi-GPU run, say) both end up with a complete copy.

Usage:

    from ltk.training.config import DataConfig
    data = prepare_data(DataConfig())            # the embedded corpus, BPE vocab 2048
    loader = TokenLoader(data.train_files, block_size=256, batch_size=8)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers

from ltk.training.clean import clean_documents
from ltk.training.corpus import load_documents, source_fingerprint
from ltk.training.progress import Steps, progress
from ltk.training.shards import write_shard
from ltk.training.tokenizer import Tokenizer

if TYPE_CHECKING:
    from ltk.training.config import DataConfig

# Bump whenever any step's output changes for the same input, so that old caches are not reused.
DATA_FORMAT_VERSION = 1
SHARD_TOKENS = 2**24  # tokens per shard file (32 MiB as uint16); the last one holds the rest
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
_ENCODE_DOCS = 256  # documents per encode_batch call: parallel enough, bounded memory


@dataclass
class PreparedData:
    """A prepared dataset folder: the shards of each split, its tokenizer and its meta.json."""

    path: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]
    train_files: list[Path]
    val_files: list[Path]
    from_cache: bool = field(default=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def train_tokens(self) -> int:
        return self.meta["splits"]["train"]["tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["splits"]["val"]["tokens"]


def prepare_data(cfg: DataConfig, *, verbose: bool = True) -> PreparedData:
    """Return the prepared dataset for `cfg`, building it first unless it is cached."""
    key = dataset_key(cfg)
    root = cache_root(cfg) / "data"
    final = root / key
    if (final / META_FILE).is_file():
        data = load_prepared(final)
        data.from_cache = True
        if verbose:
            print(f"data: using cached {final} ({data.train_tokens:,} train / {data.val_tokens:,} val tokens)")
        return data
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    try:
        _build(cfg, tmp, verbose)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if not (final / META_FILE).is_file():
                raise RuntimeError(f"cannot move the prepared data into {final}: {e}; if that folder "
                                   "exists without meta.json, delete it and try again") from e
            shutil.rmtree(tmp)  # another process finished the same build first: same result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"data: written to {final}")
    return load_prepared(final)


def load_prepared(path: str | Path) -> PreparedData:
    """Open a folder written by prepare_data (e.g. the one a checkpoint was trained on)."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a prepared dataset: it has no {META_FILE}")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format_version") != DATA_FORMAT_VERSION:
        raise ValueError(f"{path} was prepared with data format {meta.get('format_version')}; this "
                         f"code reads format {DATA_FORMAT_VERSION}: delete the folder and prepare again")
    tokenizer = Tokenizer.load(path / TOKENIZER_FILE, eot_token=meta["tokenizer"]["eot_token"])
    splits = meta["splits"]
    return PreparedData(path=path, tokenizer=tokenizer, meta=meta,
                        train_files=[path / name for name in splits["train"]["files"]],
                        val_files=[path / name for name in splits["val"]["files"]])


def cache_root(cfg: DataConfig) -> Path:
    """cfg.cache_dir, else $LTK_CACHE, else ~/.cache/ltk."""
    return Path(cfg.cache_dir or os.environ.get("LTK_CACHE") or "~/.cache/ltk").expanduser()


def dataset_key(cfg: DataConfig) -> str:
    """A 16-hex-digit hash of everything that decides the prepared dataset's contents."""
    recipe: dict[str, Any] = {
        "format_version": DATA_FORMAT_VERSION,
        "tokenizers_version": tokenizers.__version__,  # BPE training may differ between versions
        "source": source_fingerprint(cfg),
        "min_chars": cfg.min_chars,
        "val_fraction": cfg.val_fraction,
    }
    if cfg.tokenizer is None:
        recipe["vocab_size"] = cfg.vocab_size
    else:
        recipe["tokenizer"] = _tokenizer_hash(Path(cfg.tokenizer).expanduser())
    blob = json.dumps(recipe, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split into (train, val) by a hash of each document's text, keeping their order.

    A document goes to val when its hash, read as a number in [0, 1), is below val_fraction.
    The decision depends on the text alone: the same document lands in the same split
    whatever else the corpus holds, so adding data never moves a val document into train.
    (Duplicates were removed before, so no text can sit on both sides.) Each side gets at
    least one document: if hashing left one empty, the document closest to the threshold moves.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents for a train and a val split, got {len(docs)}")
    scores = [_unit_hash(doc) for doc in docs]
    in_val = [score < val_fraction for score in scores]
    if not any(in_val):
        in_val[int(np.argmin(scores))] = True
    if all(in_val):
        in_val[int(np.argmax(scores))] = False
    train = [doc for doc, v in zip(docs, in_val) if not v]
    val = [doc for doc, v in zip(docs, in_val) if v]
    return train, val


def _unit_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _tokenizer_hash(path: Path) -> str:
    """Content hash of a tokenizer file, or of a folder's tokenizer.json + tokenizer_config.json."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    files = [path / "tokenizer.json", path / "tokenizer_config.json"] if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _build(cfg: DataConfig, out: Path, verbose: bool) -> None:
    """Run every step and write the dataset into the (temporary) folder `out`."""
    start = time.perf_counter()
    steps = Steps("data", 4)  # on a terminal: which step runs now (the BPE training is silent and slow)
    steps.begin("reading")
    docs, source = load_documents(cfg)
    steps.begin("cleaning")
    docs, cleaning = clean_documents(docs, cfg.min_chars)
    if len(docs) < 2:
        raise ValueError(
            f"only {len(docs)} document(s) left after cleaning {source.description} "
            f"({cleaning.docs_in} read, {cleaning.dropped_short} shorter than min_chars={cfg.min_chars}, "
            f"{cleaning.dropped_duplicate} duplicates); need at least 2 to hold out a val split: "
            "add text or lower --data.min_chars")
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    steps.begin(f"training the tokenizer on {len(train_docs):,} documents" if cfg.tokenizer is None
                else "loading the tokenizer")
    if cfg.tokenizer is None:
        # Trained on train only: merges learned from val text would leak it into the model.
        tokenizer = Tokenizer.train_bpe(train_docs, cfg.vocab_size)
    else:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    tokenizer.save(out / TOKENIZER_FILE)
    steps.begin("encoding")
    splits = {name: _write_split(tokenizer, split_docs, out, name)
              for name, split_docs in (("train", train_docs), ("val", val_docs))}
    steps.close()
    meta = {
        "format_version": DATA_FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "source": source.to_dict(),
        "cleaning": cleaning.to_dict(),
        "tokenizer": {"file": TOKENIZER_FILE, "trained": cfg.tokenizer is None, "eot_token": tokenizer.eot_token,
                      "eot_id": tokenizer.eot_id, "vocab_size": tokenizer.vocab_size,
                      "requested_vocab_size": cfg.vocab_size if cfg.tokenizer is None else None},
        "splits": splits,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if verbose:
        print(_summary(meta))


def _write_split(tokenizer: Tokenizer, docs: list[str], out: Path, name: str) -> dict[str, Any]:
    """Encode `docs` into one stream with EOT after each, written as shards `<name>_NNNN.bin`.

    Documents are encoded a batch at a time and shards written as they fill, so memory holds
    at most about one shard of tokens. A document may straddle two shards: windows never
    cross a shard boundary (loader.py), which costs at most one window of context per shard.
    """
    writer = _ShardWriter(out, name, tokenizer.vocab_size, SHARD_TOKENS)
    bar = progress(total=len(docs), desc=f"data: encoding {name}", unit="doc")
    for start in range(0, len(docs), _ENCODE_DOCS):
        batch = docs[start:start + _ENCODE_DOCS]
        for ids in tokenizer.encode_batch(batch):
            ids.append(tokenizer.eot_id)
            writer.add(np.asarray(ids, dtype=np.uint32))
        bar.update(len(batch))
    bar.close()
    files = writer.close()
    return {"documents": len(docs), "bytes": sum(len(doc.encode("utf-8")) for doc in docs),
            "tokens": writer.total, "files": files}


class _ShardWriter:
    """Collects token arrays and writes shards of exactly SHARD_TOKENS (the last: the rest)."""

    def __init__(self, folder: Path, prefix: str, vocab_size: int, shard_tokens: int):
        self.folder, self.prefix, self.vocab_size, self.shard_tokens = folder, prefix, vocab_size, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.total = 0
        self.files: list[str] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        self.total += tokens.size
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:self.shard_tokens])
            self.pending = [stream[self.shard_tokens:]]
            self.pending_tokens = self.pending[0].size

    def close(self) -> list[str]:
        if self.pending_tokens or not self.files:
            self._write(np.concatenate(self.pending) if self.pending else np.zeros(0, np.uint32))
        return self.files

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.prefix}_{len(self.files):04d}.bin"
        write_shard(self.folder / name, tokens, self.vocab_size)
        self.files.append(name)


def _summary(meta: dict[str, Any]) -> str:
    src, cl, tok, splits = meta["source"], meta["cleaning"], meta["tokenizer"], meta["splits"]
    lines = [f"data: {src['description']}: {src['documents']:,} documents, {src['bytes_read'] / 1e6:.2f} MB read"]
    if src["invalid_utf8_replacements"] or src["skipped_records"]:
        lines.append(f"data: {src['invalid_utf8_replacements']} invalid UTF-8 sequences replaced, "
                     f"{src['skipped_records']} records skipped")
    lines.append(f"data: cleaning kept {cl['docs_out']:,} of {cl['docs_in']:,} documents "
                 f"(dropped {cl['dropped_short']} short, {cl['dropped_duplicate']} duplicate; "
                 f"removed {cl['control_chars_removed']} control chars)")
    how = f"trained byte-level BPE (asked {tok['requested_vocab_size']})" if tok["trained"] else "loaded"
    lines.append(f"data: tokenizer {how}: vocab {tok['vocab_size']}, end-of-text id {tok['eot_id']}")
    for name, s in splits.items():
        text_tokens = max(s["tokens"] - s["documents"], 1)  # without the EOT after each document
        lines.append(f"data: {name}: {s['documents']:,} docs, {s['bytes']:,} bytes, {s['tokens']:,} tokens "
                     f"({s['bytes'] / text_tokens:.2f} bytes/token) in {len(s['files'])} shard(s)")
    lines.append(f"data: built in {meta['build_seconds']:.1f} s")
    return "\n".join(lines)
