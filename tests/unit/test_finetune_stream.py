"""Fine-tuning data at scale through the training loop: a JSONL streamed row by row (task.stream)
resumes exactly, N + resume + N == 2N bit for bit; a chat template (task.chat_template) puts the
labels on the assistant turns only, in the streamed and the in-memory path; bad settings are
refused before the base loads, naming the flag, the file or the folder."""
import json

import pytest
import torch

from ltk.cli import build_parser, main
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import ConfigError
from ltk.training.finetune import FinetuneConfig, run_config, run_finetune
from ltk.training.instruct_stream import in_val

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()
# rows of uneven length, 200 of them: the stream's shuffle buffer (16) is far smaller than the file
ALPACA = [{"instruction": f"Repeat {i % 50}.", "input": " ".join(WORDS[:1 + i % 7]),
           "output": " ".join(WORDS[:1 + i % 7])} for i in range(200)]
CHAT = [{"messages": [{"role": "user", "content": f"count {i % 40}"},
                      {"role": "assistant", "content": " ".join(WORDS[:1 + i % 5])},
                      {"role": "user", "content": "again"},
                      {"role": "assistant", "content": " ".join(WORDS[-(1 + i % 3):])}]} for i in range(200)]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}</s>\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>\n{% endif %}"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    (root / "chat").mkdir()
    (root / "chat" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (root / "plain").mkdir()
    (root / "plain" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {"alpaca": _jsonl(root / "alpaca.jsonl", ALPACA), "chat": _jsonl(root / "chat.jsonl", CHAT),
            "template": str(root / "chat"), "plain": str(root / "plain")}


def _cfg(base, out, steps, data, **kw):
    kw = {"stream": True, "stream_buffer": 16, "val_rows": 8, **kw}
    return FinetuneConfig(method="lora", base=str(base), data=data, out_dir=str(out), steps=steps, batch_size=4,
                          max_len=64, eval_every=0, device="cpu", **kw)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_streamed_run_resumes_bit_for_bit(tiny_base, tmp_path, files):
    whole, split = tmp_path / "whole", tmp_path / "split"
    s = run_finetune(_cfg(tiny_base, whole, 4, files["alpaca"], grad_accum=2, packing=True, val_rows=1000))
    # the first half through `ltk finetune`'s flags, the rest through `ltk train --resume` (the checkpoint's config)
    assert main(["finetune", "--method", "lora", "--base", str(tiny_base), "--data", files["alpaca"], "--out",
                 str(split), "--steps", "2", "--batch-size", "4", "--max-len", "64", "--eval-every", "0",
                 "--device", "cpu", "--grad-accum", "2", "--packing", "--stream", "--stream-buffer", "16"]) == 0
    position = load_checkpoint(split).state["loader"]
    assert position["batches"] == 4 and position["stream"]["offset"] > 0
    assert len(position["stream"]["buffer"]) == 15  # the position is taken after a row left the buffer
    assert main(["train", "--resume", str(split), "--max-steps", "4"]) == 0
    assert _losses(split) == _losses(whole) and len(_losses(whole)) == 4
    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a.state["loader"] == b.state["loader"]
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    for name, st in a.trainer["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b.trainer["optimizer"]["state"][name][k]), (name, k)
    # evaluated on the hash split's val rows; the training rows never counted (never held)
    assert s["train_examples"] is None and s["stream"]
    assert s["val_examples"] == sum(in_val(r, 0.1) for r in ALPACA) > 8 and "exact_match" not in s["after"]
    assert 0 < s["packing_efficiency"] <= 1 and s["after"]["val_loss"] > 0


@pytest.mark.parametrize("stream", [True, False])
def test_chat_template_labels_only_the_assistant_turns(tiny_base, tmp_path, files, stream):
    from ltk.training.chat_template import load_chat_template
    from ltk.training.instruct_run import InstructTask
    from ltk.training.tokenizer import Tokenizer

    cfg = _cfg(tiny_base, tmp_path / "ft", 2, files["chat"], chat_template=files["template"])
    cfg.stream, cfg.max_len = stream, 96  # the longest conversation renders to 82 tokens: none cut
    run = run_config(cfg)
    from ltk.training.base_model import adopt_base

    tok = Tokenizer.load(adopt_base(run).tok_dir)
    task = InstructTask(run, tok)
    held = [r["messages"] for r in CHAT if in_val(r, 0.1)][:8]
    assert len(task.val) == 8 and (task.train is None) == stream
    template = load_chat_template(files["template"])
    for (ids, labels), messages in zip(task.val, held):
        assert tok.decode(ids + [labels[-1]]) == template.render(messages)
        learned = tok.decode([t for t in labels if t != -100])
        assert learned == "".join(f"{m['content']}</s>\n" for m in messages if m["role"] == "assistant")
    x, y = task.loader.next_batch()  # the training batches: rendered by the template too
    assert all("<assistant>\n" in tok.decode(row.tolist()) for row in x)
    assert {tok.decode([int(t) for t in row if t != -100]).count("</s>\n") for row in y} == {2}
    if stream:  # and it trains (the loop is the same for both)
        s = run_finetune(cfg)
        assert s["chat_template"] == files["template"] and s["after"]["val_loss"] < s["before"]["val_loss"]


def test_bad_settings_are_refused_naming_the_problem(tiny_base, tmp_path, files, capsys):
    def refused(match, **kw):
        with pytest.raises(ConfigError, match=match):
            run_finetune(_cfg(tiny_base, tmp_path / "bad", 1, **kw))

    refused(r"--task.stream reads a .jsonl file .* not --task.data 'builtin'", data="builtin")
    refused(r"--task.limit .* --task.stream .* give one", data=files["alpaca"], limit=50)
    refused(r"--task.stream_buffer must be >= 1", data=files["alpaca"], stream_buffer=0)
    refused(rf"--task.chat_template {files['plain']}: chat template {files['plain']}: no chat_template",
            data=files["chat"], chat_template=files["plain"])
    refused(r"--task.chat_template base: chat template .*step_\d+: no chat_template",  # our base has none
            data=files["chat"], chat_template="base")
    refused(r"--task.chat_template .*missing: chat template .*missing: no such folder", data=files["chat"],
            chat_template=str(tmp_path / "missing"))
    assert not (tmp_path / "bad" / "checkpoints").exists()
    help_text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "--stream " in help_text and "--stream-buffer" in help_text and "--chat-template FOLDER|base" in help_text


def test_base_takes_the_template_of_a_hugging_face_base(hf_gpt2, tmp_path, files):
    import shutil

    from ltk.training.base_model import adopt_base
    from ltk.training.chat_template import template_for
    from ltk.training.config_check import check_run

    base = shutil.copytree(hf_gpt2, tmp_path / "hf")
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    run = run_config(_cfg(base, tmp_path / "ft", 1, files["chat"], chat_template="base", stream=False))
    run.task.max_len = 32
    adopt_base(run)
    check_run(run, size=False, warn=False)
    template = template_for("base", str(base))
    assert template.source == TEMPLATE and template.special == {"eos_token": "</s>"}
