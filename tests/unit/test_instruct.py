"""Instruction data: templates, file parsing and its errors, loss masks, truncation, batches,
the built-in task, the train/val split and exact-match scoring."""
import json

import pytest
import torch

from ltk.models.gpt import GPT, GPTConfig
from ltk.training.instruct import (
    IGNORE_INDEX,
    Example,
    batches,
    builtin_kind,
    builtin_task,
    encode_example,
    exact_match,
    generate_responses,
    load_examples,
    render_alpaca,
    render_chat,
    split,
)
from ltk.training.instruct_task import INSTRUCTIONS
from ltk.training.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def bytes_tok():
    """vocab 257: no merges, so every byte of text is exactly one token."""
    return Tokenizer.train_bpe(["abcdefxy"], 257)


@pytest.fixture(scope="module")
def task_tok():
    """A BPE trained on the built-in task's own text."""
    return Tokenizer.train_bpe([e.prompt + e.response for e in builtin_task(300)], 400)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def fields(prompt):
    """(instruction, input) read back out of an Alpaca prompt."""
    instruction = prompt.split("### Instruction:\n")[1].split("\n\n")[0]
    inp = prompt.split("### Input:\n")[1].split("\n\n### Response:")[0] if "### Input:" in prompt else ""
    return instruction, inp


# -- templates and files -------------------------------------------------------------------

def test_alpaca_template_with_and_without_input():
    with_input = render_alpaca("Do it.", "some input")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nDo it.\n\n### Input:\nsome input\n\n### Response:\n" in with_input
    plain = render_alpaca("Do it.")
    assert "paired with an input" not in plain and "### Input" not in plain
    assert plain.endswith("### Instruction:\nDo it.\n\n### Response:\n")


def test_chat_prompt_holds_every_turn_before_the_last_answer():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    prompt, answer = render_chat(msgs)
    assert answer == "4"
    assert prompt == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello\n\n"
                      "### User:\n2+2?\n\n### Assistant:\n")


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1 has role 'bot'"),
    ([{"role": "user", "content": "a"}], "no assistant turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "last message must be the assistant"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
     "message 1 is a system message"),
    ([{"role": "user"}], "message 0 must be an object with 'role' and 'content'"),
    ([], "non-empty list"),
])
def test_chat_errors_name_the_problem(msgs, match):
    with pytest.raises(ValueError, match=match):
        render_chat(msgs)


def test_alpaca_file_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Say hi.", "output": "hi"}, "",
        {"instruction": "Echo.", "input": "x", "output": "x"},
        {"instruction": "Echo.", "input": "", "output": "y"}])
    got = load_examples(path)
    assert got == [Example(render_alpaca("Say hi."), "hi"), Example(render_alpaca("Echo.", "x"), "x"),
                   Example(render_alpaca("Echo."), "y")]
    assert load_examples(path, limit=2) == got[:2]


def test_chat_file(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "c.jsonl",
                       [{"messages": msgs}, {"messages": msgs[:1] + [msgs[1] | {"content": "Yo"}]}])
    assert load_examples(path) == [Example("### User:\nHi\n\n### Assistant:\n", "Hello"),
                                   Example("### User:\nHi\n\n### Assistant:\n", "Yo")]


@pytest.mark.parametrize("rows, match", [
    ([{"instruction": "a", "output": "b"}, '{"instruction": "a", "output"'], r"bad\.jsonl, line 2: not valid JSON"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], r"line 2: missing field 'output'"),
    ([{"input": "a", "output": "b"}], r"line 1: missing field 'instruction'"),
    ([{"instruction": "a", "output": 3}], r"line 1: field 'output' must be a string"),
    (["[1, 2]"], r"line 1: a row must be a JSON object"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}],
     r"line 1: message 1 has role 'robot'"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
      {"instruction": "a", "output": "b"}], r"line 2: a alpaca row in a file of chat rows"),
])
def test_file_errors_name_file_line_and_field(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        load_examples(path)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'builtin', 'builtin:KIND,...' or a .jsonl file"):
        load_examples(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="no examples"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", [""]))


# -- loss mask and truncation --------------------------------------------------------------

def test_label_mask_by_hand(bytes_tok):
    a, b, c, d, e, f, x, y = (bytes_tok.encode(ch)[0] for ch in "abcdefxy")
    eot = bytes_tok.eot_id
    ids, labels = encode_example(bytes_tok, Example("ab", "c"), max_len=16)
    assert ids == [a, b, c]  # ids = a b c eot, without its last token
    assert labels == [IGNORE_INDEX, c, eot]  # "a -> b" is a prompt target; c and eot are learned
    ids, labels = encode_example(bytes_tok, Example("abcd", "xy"), max_len=16)
    assert ids == [a, b, c, d, x, y]
    assert labels == [IGNORE_INDEX] * 3 + [x, y, eot]
    ids, labels = encode_example(bytes_tok, Example("ab", ""), max_len=16)  # empty answer: learn to stop
    assert (ids, labels) == ([a, b], [IGNORE_INDEX, eot])


def test_truncation_cuts_the_prompt_from_the_left(bytes_tok):
    d, e, f, x, y = (bytes_tok.encode(ch)[0] for ch in "defxy")
    eot = bytes_tok.eot_id
    ex = Example("abcdef", "xy")
    assert len(encode_example(bytes_tok, ex, max_len=9)[0]) == 8  # fits exactly: nothing cut
    assert encode_example(bytes_tok, ex, max_len=6) == ([d, e, f, x, y], [IGNORE_INDEX, IGNORE_INDEX, x, y, eot])
    assert encode_example(bytes_tok, ex, max_len=4) == ([f, x, y], [x, y, eot])  # one prompt token left
    with pytest.raises(ValueError, match=r"max_len=3 is too short: the response is 2 tokens.*max_len >= 4"):
        encode_example(bytes_tok, ex, max_len=3)


def test_mask_on_a_real_template(task_tok):
    ex = builtin_task(1)[0]
    p, r = task_tok.encode(ex.prompt), task_tok.encode(ex.response)
    ids, labels = encode_example(task_tok, ex, max_len=512)
    assert len(ids) == len(labels) == len(p) + len(r)
    assert labels[:len(p) - 1] == [IGNORE_INDEX] * (len(p) - 1)
    assert labels[len(p) - 1:] == r + [task_tok.eot_id]
    assert ids == p + r  # inputs: the whole sequence but its last token (eot)
    assert task_tok.decode(t for t in labels if t != IGNORE_INDEX) == ex.response + task_tok.eot_token


# -- batches -------------------------------------------------------------------------------

def test_batches_shapes_padding_and_epochs(task_tok):
    exs = builtin_task(10)
    enc = [encode_example(task_tok, ex, 64) for ex in exs]
    got = list(batches(exs, task_tok, 4, 64, shuffle=False, epochs=2))
    assert [x.shape[0] for x, _ in got] == [4, 4, 2, 4, 4, 2]  # every example once per epoch
    for k, (x, y) in enumerate(got[:3]):
        rows = enc[4 * k:4 * k + 4]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape
        assert x.shape[1] == max(len(i) for i, _ in rows) <= 63
        for r, (ids, labels) in enumerate(rows):
            n = len(ids)
            assert x[r, :n].tolist() == ids and y[r, :n].tolist() == labels
            assert torch.all(x[r, n:] == task_tok.eot_id) and torch.all(y[r, n:] == IGNORE_INDEX)


def test_batches_shuffle_is_deterministic_per_seed(task_tok):
    exs = builtin_task(12)

    def take(seed, n=6):
        it = batches(exs, task_tok, 4, 128, seed=seed)  # epochs=None: runs on past one epoch
        return [next(it) for _ in range(n)]

    a, b, c = take(1), take(1), take(2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert any(x1.shape != x2.shape or not torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    first_epoch = sorted(tuple(r[r != IGNORE_INDEX].tolist()) for _, y in a[:3] for r in y)
    assert first_epoch == sorted(tuple(l[-len(task_tok.encode(e.response)) - 1:]) for e in exs
                                 for l in [encode_example(task_tok, e, 128)[1]])


def test_batches_errors_name_the_example(task_tok):
    exs = [Example("### Response:\n", "ok"), Example("a", "a long answer that cannot fit here")]
    with pytest.raises(ValueError, match="example 1: max_len=6 is too short"):
        batches(exs, task_tok, 2, 6)


# -- built-in task and split ---------------------------------------------------------------

def test_builtin_task_is_deterministic_and_correct():
    exs = builtin_task(300, seed=3)
    assert exs == builtin_task(300, seed=3) and exs != builtin_task(300, seed=4)
    assert builtin_task(50, seed=3) == exs[:50]
    assert load_examples("builtin", limit=20) == builtin_task(20, seed=0)
    seen = set()
    for ex in exs:
        assert ex.prompt == render_alpaca(*fields(ex.prompt))
        instruction, inp = fields(ex.prompt)
        kind = builtin_kind(ex)
        seen.add(kind)
        if kind == "lookup":
            table = dict(line.split(" = ") for line in inp.splitlines())
            key = instruction.split()[-1].rstrip("?")
            assert 3 <= len(table) <= 5 and ex.response == table[key]
            continue
        letters = inp.split()
        assert 3 <= len(letters) <= 5 and all(len(t) == 1 and t.islower() for t in letters)
        want = {"last": letters[-1:], "reverse": letters[::-1], "sort": sorted(letters)}[kind]
        assert ex.response.split() == want
    assert seen == set(INSTRUCTIONS)


def test_builtin_kinds_can_be_chosen():
    exs = load_examples("builtin:last,lookup", limit=40)
    assert [builtin_kind(e) for e in exs[:4]] == ["last", "lookup", "last", "lookup"]
    with pytest.raises(ValueError, match="unknown built-in task kind.*choose from last, lookup, reverse, sort"):
        load_examples("builtin:add")
    with pytest.raises(ValueError, match="not a built-in task instruction"):
        builtin_kind(Example(render_alpaca("Translate this."), "x"))


def test_split_is_deterministic_and_keeps_prompts_apart():
    exs = builtin_task(400)
    train, val = split(exs, 0.2, seed=5)
    assert (train, val) == split(exs, 0.2, seed=5) and val != split(exs, 0.2, seed=6)[1]
    assert len(train) + len(val) == len(exs) and 75 <= len(val) <= 90
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    assert sorted(map(repr, train + val)) == sorted(map(repr, exs))
    with pytest.raises(ValueError, match="val_fraction"):
        split(exs, 1.0, 0)


# -- exact match ---------------------------------------------------------------------------

class Scripted(torch.nn.Module):
    """A stand-in model: after a known prompt it emits the given tokens, one per step."""

    def __init__(self, tok, replies: dict[tuple, list[int]]):
        super().__init__()
        self.replies, self.V = replies, tok.vocab_size

    def forward(self, idx):
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.V)
        for b, row in enumerate(idx.tolist()):
            for prompt, reply in self.replies.items():
                if tuple(row[:len(prompt)]) == prompt:
                    logits[b, -1, reply[min(len(row) - len(prompt), len(reply) - 1)]] = 1.0
        return logits


def test_exact_match_right_and_wrong_answers(task_tok):
    exs = builtin_task(9)
    eot = task_tok.eot_id
    right = {tuple(task_tok.encode(e.prompt)): task_tok.encode(e.response) + [eot] for e in exs}
    assert exact_match(Scripted(task_tok, right), task_tok, exs, batch_size=4) == 1.0
    wrong = {p: task_tok.encode("0 ") + r for p, r in right.items()}  # a wrong first token
    assert exact_match(Scripted(task_tok, wrong), task_tok, exs) == 0.0
    half = {p: (r if i % 3 else [eot]) for i, (p, r) in enumerate(right.items())}  # every 3rd stays silent
    assert exact_match(Scripted(task_tok, half), task_tok, exs) == pytest.approx(6 / 9)
    endless = {p: r[:-1] + task_tok.encode(" more") for p, r in right.items()}  # no eot: runs on
    assert exact_match(Scripted(task_tok, endless), task_tok, exs, max_new_tokens=12) == 0.0


def test_batched_greedy_answers_equal_one_at_a_time(task_tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=task_tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16,
                          backend="torch"))
    prompts = [e.prompt for e in builtin_task(8)]
    together = generate_responses(model, task_tok, prompts, max_new_tokens=5, batch_size=8)
    alone = [generate_responses(model, task_tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone and all(isinstance(a, str) for a in together)
