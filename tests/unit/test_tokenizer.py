"""Tokenizer: BPE training, exact round trips, byte lengths, saving and loading."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from ltk.training.tokenizer import EOT_TOKEN, Tokenizer, bytes_to_unicode

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "héllo — 日本語のテキスト, naïve café, emoji 🙂",
    "for i in range(10):\n\tprint(i * i)\n",
] * 20

SAMPLES = ["héllo — 日本", "  indented\n\tcode()\n", "🙂🙃 mixed ASCII and ünïcödé", "a", "",
           "text with <|endoftext|> inside", "\x00\x01 raw control bytes"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(CORPUS, vocab_size=320)


def test_training_gives_requested_vocab_and_eot(tok):
    assert tok.vocab_size == 320
    assert tok.eot_token == EOT_TOKEN
    assert tok.backend.token_to_id(EOT_TOKEN) == tok.eot_id


def test_training_is_deterministic(tok):
    again = Tokenizer.train_bpe(CORPUS, vocab_size=320)
    assert again.backend.get_vocab() == tok.backend.get_vocab()


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_text_cannot_forge_end_of_text(tok):
    ids = tok.encode("before <|endoftext|> after")
    assert tok.eot_id not in ids
    assert tok.decode(ids + [tok.eot_id]).endswith("after" + EOT_TOKEN)


def test_merges_compress(tok):
    text = "The quick brown fox jumps over the lazy dog."  # seen 20 times in training
    assert len(tok.encode(text)) < 0.75 * len(text.encode())  # 63 merges already pay


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


@pytest.mark.parametrize("text", SAMPLES)
def test_token_byte_lengths_sum_to_utf8_length(tok, text):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_special_tokens_stand_for_no_bytes(tok):
    assert tok.token_byte_lengths()[tok.eot_id] == 0


def test_byte_table_is_the_byte_level_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("a")] == "a"


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train_bpe(CORPUS, vocab_size=256)


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(path)
    assert loaded.eot_id == tok.eot_id and loaded.vocab_size == tok.vocab_size
    assert [loaded.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    assert tok.save(tmp_path) == tmp_path / "tokenizer.json"  # a folder gets tokenizer.json


@pytest.mark.parametrize("eos", ["</s>", {"content": "</s>", "special": True}])
def test_hf_folder_reads_eos_from_config(tmp_path, eos):
    base = Tokenizer.train_bpe(CORPUS, vocab_size=300, eot_token="</s>")
    base.backend.add_special_tokens(["<|endoftext|>"])  # present, but the config names </s>
    base.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.eot_token == "</s>" and loaded.eot_id == base.eot_id


def test_hf_folder_without_config_falls_back_to_known_names(tmp_path):
    Tokenizer.train_bpe(CORPUS, vocab_size=300, eot_token="<eos>").save(tmp_path)
    assert Tokenizer.load(tmp_path).eot_token == "<eos>"


def test_unknown_end_of_text_is_an_error(tmp_path):
    Tokenizer.train_bpe(CORPUS, vocab_size=300, eot_token="<stop>").save(tmp_path)
    with pytest.raises(ValueError, match="cannot tell which token ends a text"):
        Tokenizer.load(tmp_path)
    assert Tokenizer.load(tmp_path, eot_token="<stop>").eot_token == "<stop>"


def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.load(tmp_path / "missing")


def test_loaded_truncation_is_switched_off(tok, tmp_path):
    tok.backend.enable_truncation(4)
    try:
        tok.backend.save(str(tmp_path / "tokenizer.json"))
    finally:
        tok.backend.no_truncation()
    text = "for i in range(10):\n\tprint(i * i)\n" * 3
    assert len(Tokenizer.load(tmp_path).encode(text)) > 4


def test_non_byte_level_byte_lengths_fall_back_to_decode():
    vocab = {"hello": 0, "wörld": 1, "[UNK]": 2, "</s>": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>"])
    lengths = Tokenizer(backend, "</s>").token_byte_lengths()
    assert lengths.tolist() == [5, 6, 5, 0]
    assert lengths.dtype == np.int64
