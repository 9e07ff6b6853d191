"""Streaming instruction data (ltk/training/instruct_stream.py): the rows of loading whole, in
bounded memory, resumable; chat templates (ltk/training/chat_template.py) as transformers renders
them, the labels on exactly the assistant tokens."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from ltk.training.instruct import load_examples
from ltk.training.instruct_stream import JsonlStream, StreamBatches, in_val, parse_row, row_encoder

ROWS = [{"instruction": f"say {i % 17}", "input": "x" * (i % 3), "output": f"answer {i}"} for i in range(60)]


@pytest.fixture
def alpaca(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + ("\n\n" if i == 7 else "\n") for i, r in enumerate(ROWS)))
    return path


def _rows(stream):
    return [row for row, _ in stream]


def test_stream_yields_the_rows_of_loading_whole(alpaca):
    whole = load_examples(str(alpaca))
    val = [in_val(r, 0.2) for r in ROWS]
    assert 0 < sum(val) < len(ROWS)  # both sides hold rows
    ordered = _rows(JsonlStream(alpaca, split="train", val_fraction=0.2, shuffle=False, epochs=1))
    assert ordered == [r for r, v in zip(ROWS, val) if not v]
    shuffled = _rows(JsonlStream(alpaca, split="train", val_fraction=0.2, buffer=8, seed=3, epochs=1))
    assert shuffled != ordered and sorted(map(json.dumps, shuffled)) == sorted(map(json.dumps, ordered))
    held = _rows(JsonlStream(alpaca, split="val", val_fraction=0.2, shuffle=False, epochs=1))
    assert len(held) + len(ordered) == len(whole) == len(ROWS)
    # rows with the same prompt land on one side
    assert not {r["instruction"] + r["input"] for r in held} & {r["instruction"] + r["input"] for r in ordered}
    again = _rows(JsonlStream(alpaca, split="train", val_fraction=0.2, buffer=8, seed=3, epochs=2))
    assert again[:len(shuffled)] == shuffled and again[len(shuffled):] != shuffled  # a new order each epoch


def test_resume_position_continues_the_same_rows(alpaca, tiny_base):
    from ltk.training.checkpoint import resolve_checkpoint
    from ltk.training.tokenizer import Tokenizer

    tok = Tokenizer.load(resolve_checkpoint(tiny_base) / "tokenizer.json")
    make = lambda: StreamBatches(JsonlStream(alpaca, val_fraction=0.2, buffer=8, seed=1),  # noqa: E731
                                 row_encoder(tok, 64), batch_size=5, pad_id=tok.eot_id)
    a = make()
    for _ in range(7):  # past the end of the first epoch (48 or so training rows)
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    expected = [next(a) for _ in range(12)]
    b = make()
    b.load_state_dict(state)
    for (x, y), (xb, yb) in zip(expected, (next(b) for _ in range(12))):
        assert x.equal(xb) and y.equal(yb)


def test_memory_does_not_grow_with_the_file(tmp_path):
    path = tmp_path / "big.jsonl"
    row = {"instruction": "Repeat the words.", "input": "alpha beta gamma " * 2, "output": "ok " * 5}
    path.write_text((json.dumps(row) + "\n") * 20_000)
    size = path.stat().st_size  # ~2 MB
    stream = JsonlStream(path, split="all", buffer=64, epochs=1)
    tracemalloc.start()
    n = sum(1 for _ in stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 20_000 and peak < size / 100, (peak, size)  # about 20 kB; rows held whole: several times the file


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        _rows(JsonlStream(path, split="all", epochs=1))
    with pytest.raises(ValueError, match="line 1"):
        parse_row(b"[1]", "line 1")


LLAMA3 = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
          "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_MARKED = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                 "<|end_header_id|>\n\n{% if message['role'] == 'assistant' %}{% generation %}"
                 "{{ message['content'] | trim }}<|eot_id|>{% endgeneration %}{% else %}"
                 "{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha beta?"},
        {"role": "assistant", "content": "gamma delta"}, {"role": "user", "content": "and then"},
        {"role": "assistant", "content": " epsilon zeta "}]


def _llama_folder(folder, corpus, template):
    from ltk.training.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe([p.read_text() for p in sorted(corpus.iterdir())][:20], 300)
    tok.backend.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    folder.mkdir()
    tok.save(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_chat_template_renders_as_transformers_and_labels_the_assistant_tokens(tiny_corpus, tmp_path):
    tf = pytest.importorskip("transformers")
    from ltk.training.chat_template import load_chat_template
    from ltk.training.tokenizer import Tokenizer

    plain = _llama_folder(tmp_path / "plain", tiny_corpus, LLAMA3)
    marked = _llama_folder(tmp_path / "marked", tiny_corpus, LLAMA3_MARKED)
    hf = tf.AutoTokenizer.from_pretrained(marked)
    text = hf.apply_chat_template(CHAT, tokenize=False)
    ours = load_chat_template(plain)
    assert ours.render(CHAT) == text and "<|eot_id|>" in text
    assert ours.render(CHAT[:2], add_generation_prompt=True) == hf.apply_chat_template(
        CHAT[:2], tokenize=False, add_generation_prompt=True)
    out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    expected = [i if m else -100 for i, m in zip(ids[1:], mask[1:])]
    assert sum(mask) > 4
    tok = Tokenizer.load(plain)
    for template in (ours, load_chat_template(marked)):  # by rendering prefixes, and by the markers
        x, y = template.encode(tok, CHAT, max_len=512)
        assert x == ids[:-1] and y == expected
    # the tokenizer's own guard stays on: plain text never forges a special token
    assert tok.encode("<|eot_id|>") != [tok.backend.token_to_id("<|eot_id|>")]
