"""Document sources: folders, single files, JSONL, Parquet, the embedded corpus, bad input."""
import gzip
import json
import sys
import warnings
from pathlib import Path

import pytest

from ltk.training.config import DataConfig
from ltk.training.corpus import SourceWarning, embedded_files, load_documents, pack_paragraphs, source_fingerprint


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def load(source, **kw):
    return load_documents(DataConfig(source=str(source), **kw))


def test_folder_one_document_per_file_sorted_recursive(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.md", "ay")
    write(tmp_path / "sub" / "c.py", "sea")
    write(tmp_path / ".hidden.txt", "hidden")
    write(tmp_path / ".git" / "config", "hidden too")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    docs, stats = load(tmp_path)
    assert docs == ["ay", "bee", "sea"]
    assert (stats.documents, stats.files, stats.skipped_binary_files) == (3, 3, 1)
    assert stats.bytes_read == 8


def test_invalid_utf8_counted_and_warned_once(tmp_path):
    write(tmp_path / "a.txt", b"ok \xff\xfe here")
    write(tmp_path / "b.txt", b"bad \xc3 end")
    write(tmp_path / "c.txt", "a real \ufffd is not damage")
    with pytest.warns(SourceWarning) as caught:
        docs, stats = load(tmp_path)
    assert len(caught) == 1
    assert "3 invalid UTF-8" in str(caught[0].message) and "a.txt" in str(caught[0].message)
    assert stats.invalid_utf8_replacements == 3
    assert stats.first_invalid_utf8.endswith("a.txt")
    assert docs[0] == "ok \ufffd\ufffd here"


def test_clean_utf8_gives_no_warning_and_bom_is_dropped(tmp_path):
    write(tmp_path / "a.txt", b"\xef\xbb\xbfhello")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        docs, stats = load(tmp_path)
    assert docs == ["hello"] and stats.invalid_utf8_replacements == 0


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load(missing)


def test_folder_without_text_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable text in folder .*empty"):
        load(tmp_path / "empty")
    write(tmp_path / "bin" / "x.dat", b"\x00\x01\x02")
    with pytest.raises(ValueError, match="1 of them binary"):
        load(tmp_path / "bin")


def test_single_file_is_packed_at_paragraph_breaks(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 100 for i in range(40)]  # ~510 chars each
    text = "\n\n".join(paragraphs)
    docs, stats = load(write(tmp_path / "book.txt", text))
    assert 3 <= len(docs) <= 6
    assert all(len(d) >= 4096 for d in docs[:-1])
    assert all(d.startswith("paragraph") for d in docs)  # cut only between paragraphs
    assert "\n\n".join(docs) == text  # nothing lost but the breaks between documents
    assert stats.files == 1


def test_pack_paragraphs_small_text_is_one_document():
    assert pack_paragraphs("one\n\ntwo\n", 4096) == ["one\n\ntwo\n"]
    assert pack_paragraphs("aa\n\n\nbb\n \ncc", 2) == ["aa", "bb", "cc"]


def test_binary_single_file_rejected(tmp_path):
    with pytest.raises(ValueError, match="binary"):
        load(write(tmp_path / "x.txt", b"abc\x00def"))


def test_jsonl_documents_and_bad_lines_counted(tmp_path):
    lines = [json.dumps({"text": "first"}), "{not json", json.dumps({"other": 1}),
             "", json.dumps({"text": 5}), json.dumps(["list"]), json.dumps({"text": "second"})]
    path = write(tmp_path / "rows.jsonl", "\n".join(lines) + "\n")
    with pytest.warns(SourceWarning, match="skipped 4 record"):
        docs, stats = load(path)
    assert docs == ["first", "second"]
    assert stats.skipped_records == 4
    assert stats.first_skipped_record.startswith(f"{path}:2: not valid JSON")


def test_jsonl_without_the_field_anywhere_is_an_error(tmp_path):
    path = write(tmp_path / "rows.jsonl", json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no line has a string field 'text'.*rows.jsonl:1.*content"):
        load(path)
    docs, _ = load(path, text_field="content")
    assert docs == ["x"]


def test_folder_of_row_files_reads_rows(tmp_path):
    write(tmp_path / "data" / "part-0.jsonl", json.dumps({"text": "row one"}) + "\n" + json.dumps({"text": "row two"}))
    write(tmp_path / "data" / "README.md", "a dataset card")
    docs, stats = load(tmp_path / "data")
    assert docs == ["a dataset card", "row one", "row two"] and stats.files == 2


def test_jsonl_gz(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "héllo"}) + "\n")
    assert load(path)[0] == ["héllo"]


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "id": [1, 2, 3]}), path)
    with pytest.warns(SourceWarning, match="skipped 1"):
        docs, stats = load(path)
    assert docs == ["alpha", "gamma"] and stats.bytes_read == 10
    with pytest.raises(ValueError, match=r"no column 'body'.*\['text', 'id'\]"):
        load(path, text_field="body")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    path = write(tmp_path / "rows.parquet", b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load(path)


def test_embedded_corpus_is_deterministic_and_spread(tmp_path):
    cfg = DataConfig(max_bytes=300_000)
    docs, stats = load_documents(cfg)
    again, _ = load_documents(cfg)
    assert docs == again and len(docs) > 5
    assert 250_000 < stats.bytes_read <= 300_000
    files = embedded_files(300_000)
    parts = {p.parts for p in files}
    assert not any({"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(p) for p in parts)
    assert len({p.name[0] for p in files}) >= 8  # not just an alphabetical prefix
    assert source_fingerprint(cfg) == source_fingerprint(cfg)
    assert source_fingerprint(cfg)["python"] == sys.version
