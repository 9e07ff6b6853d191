"""prepare_data: caching, the split, EOT framing and the counts in meta.json."""
import os
import random
from dataclasses import replace

import numpy as np
import pytest

from ltk.training import data as data_mod
from ltk.training.clean import clean_documents
from ltk.training.config import DataConfig
from ltk.training.corpus import load_documents
from ltk.training.data import dataset_key, load_prepared, prepare_data, split_documents
from ltk.training.loader import TokenLoader
from ltk.training.shards import read_shard
from ltk.training.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu héllo 日本 — café".split()


def make_corpus(folder, n_docs=40, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(3, 8))]
        (folder / f"doc{i:03d}.txt").write_text(f"# document {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    (folder / "tiny.txt").write_text("too short")
    (folder / "copy.txt").write_text((folder / "doc000.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def config(tmp_path, **kw):
    kw.setdefault("source", str(make_corpus(tmp_path / "corpus")))
    return DataConfig(vocab_size=300, min_chars=20, val_fraction=0.2, cache_dir=str(tmp_path / "cache"), **kw)


def stream(files):
    return np.concatenate([np.asarray(read_shard(f), dtype=np.int64) for f in files])


def expected_splits(cfg):
    docs, _ = load_documents(cfg)
    docs, _ = clean_documents(docs, cfg.min_chars)
    return split_documents(docs, cfg.val_fraction)


def test_second_call_uses_cache(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    first = prepare_data(cfg, verbose=False)
    assert not first.from_cache
    monkeypatch.setattr(data_mod, "_build", lambda *a, **k: pytest.fail("rebuilt a cached dataset"))
    second = prepare_data(cfg, verbose=False)
    assert second.from_cache and second.path == first.path
    assert second.meta == first.meta
    assert first.path.parent == tmp_path / "cache" / "data"
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no temporary folders


def test_concurrent_build_of_the_same_dataset(tmp_path, monkeypatch):
    """Another process finishes the same dataset while this one builds: both end up with it."""
    cfg = config(tmp_path)
    real_build = data_mod._build
    calls = []

    def build_while_another_process_finishes(*args):
        calls.append(1)
        if len(calls) == 1:
            prepare_data(cfg, verbose=False)  # the "other process": builds and renames first
        real_build(*args)

    monkeypatch.setattr(data_mod, "_build", build_while_another_process_finishes)
    data = prepare_data(cfg, verbose=False)
    assert len(calls) == 2 and data.train_tokens > 0
    assert [p.name for p in data.path.parent.iterdir()] == [data.path.name]


def test_changed_source_or_config_rebuilds(tmp_path):
    cfg = config(tmp_path)
    key = dataset_key(cfg)
    assert dataset_key(replace(cfg, max_bytes=1)) == key  # only the embedded corpus reads it
    assert dataset_key(replace(cfg, text_field="body")) != key  # a folder may hold .jsonl files
    assert dataset_key(replace(cfg, min_chars=21)) != key
    assert dataset_key(replace(cfg, vocab_size=301)) != key
    doc = tmp_path / "corpus" / "doc005.txt"
    doc.write_text(doc.read_text(encoding="utf-8") + "more words here\n", encoding="utf-8")
    assert dataset_key(cfg) != key


def test_every_document_is_framed_by_eot(tmp_path):
    cfg = config(tmp_path)
    data = prepare_data(cfg, verbose=False)
    train_docs, val_docs = expected_splits(cfg)
    for files, docs in ((data.train_files, train_docs), (data.val_files, val_docs)):
        tokens = stream(files)
        assert tokens[-1] == data.eot_id
        pieces = np.split(tokens, np.flatnonzero(tokens == data.eot_id) + 1)[:-1]
        assert [data.tokenizer.decode(p[:-1]) for p in pieces] == docs


def test_meta_counts_match_the_shards(tmp_path):
    cfg = config(tmp_path)
    data = prepare_data(cfg, verbose=False)
    meta = data.meta
    train_docs, val_docs = expected_splits(cfg)
    assert data.train_tokens == len(stream(data.train_files))
    assert data.val_tokens == len(stream(data.val_files))
    assert meta["splits"]["train"]["documents"] == len(train_docs)
    assert meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val_docs)
    assert meta["cleaning"]["dropped_short"] == 1 and meta["cleaning"]["dropped_duplicate"] == 1
    assert meta["cleaning"]["docs_out"] == len(train_docs) + len(val_docs)
    assert meta["source"]["documents"] == 42
    assert meta["tokenizer"]["vocab_size"] == data.vocab_size == 300
    assert meta["config"]["vocab_size"] == 300
    assert int((stream(data.val_files) == data.eot_id).sum()) == len(val_docs)


def test_tokenizer_sees_train_only_and_reloads(tmp_path):
    data = prepare_data(config(tmp_path), verbose=False)
    reopened = load_prepared(data.path)
    assert reopened.tokenizer.encode("héllo alpha") == data.tokenizer.encode("héllo alpha")
    assert reopened.train_files == data.train_files
    assert data.meta["tokenizer"]["trained"] is True


def test_given_tokenizer_is_used(tmp_path):
    tok = Tokenizer.train_bpe(["some other text entirely"] * 5, vocab_size=280)  # runs out of merges
    path = tok.save(tmp_path / "tok.json")
    cfg = config(tmp_path, tokenizer=str(path))
    data = prepare_data(cfg, verbose=False)
    assert data.vocab_size == tok.vocab_size < 280 and data.meta["tokenizer"]["trained"] is False
    assert data.tokenizer.backend.get_vocab() == tok.backend.get_vocab()
    Tokenizer.train_bpe(["a different tokenizer"] * 5, vocab_size=270).save(path)
    assert dataset_key(cfg) != data.path.name  # keyed by the tokenizer's content, not its name


def test_split_is_deterministic_by_content():
    docs = [f"document number {i}" for i in range(200)]
    train, val = split_documents(docs, 0.1)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.1)
    assert set(val) == set(val2) and set(train) == set(train2)
    assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
    subset = docs[:100]  # removing documents moves no other document across the split
    subset_val = [d for d in val if d in subset]
    assert subset_val and split_documents(subset, 0.1)[1] == subset_val


def test_split_keeps_one_document_on_each_side():
    docs = ["a", "b", "c"]
    assert len(split_documents(docs, 0.0)[1]) == 1
    assert len(split_documents(docs, 0.999999)[0]) == 1
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["only"], 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_too_few_documents_after_cleaning(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_text("x" * 100)
    (folder / "b.txt").write_text("short")
    with pytest.raises(ValueError, match=r"only 1 document.*min_chars=20"):
        prepare_data(config(tmp_path, source=str(folder)), verbose=False)
    assert not any((tmp_path / "cache" / "data").iterdir())  # the failed build left nothing behind


def test_large_splits_are_sharded(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "SHARD_TOKENS", 500)
    data = prepare_data(config(tmp_path), verbose=False)
    sizes = [len(read_shard(f)) for f in data.train_files]
    assert len(sizes) > 2 and all(s == 500 for s in sizes[:-1]) and 0 < sizes[-1] <= 500
    assert sum(sizes) == data.train_tokens


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LTK_CACHE", str(tmp_path / "envcache"))
    cfg = config(tmp_path)
    cfg.cache_dir = None
    data = prepare_data(cfg, verbose=False)
    assert data.path.parent == tmp_path / "envcache" / "data"


def test_summary_is_printed(tmp_path, capsys):
    prepare_data(config(tmp_path))
    out = capsys.readouterr().out
    assert "dropped 1 short, 1 duplicate" in out and "bytes/token" in out


def test_feeds_the_loader(tmp_path):
    data = prepare_data(config(tmp_path), verbose=False)
    x, y = TokenLoader(data.train_files, block_size=16, batch_size=4).next_batch()
    assert x.shape == (4, 16) and int(x.max()) < data.vocab_size


def test_embedded_corpus_small(tmp_path):
    cfg = DataConfig(max_bytes=300_000, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, verbose=False)
    assert data.train_tokens > 50_000 and data.val_tokens > 0
    assert os.path.getsize(data.train_files[0]) > 100_000
    assert dataset_key(cfg) == data.path.name
