"""Every family of the zoo trains from the CLI on a CPU with its own objective, its loss
falls, and a resumed run reproduces the uninterrupted one bit for bit (the masks and spans
come from generators seeded by the step)."""
import json

import pytest
import torch

from ltk.cli import main
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import RunConfig
from ltk.training.objectives import MaskedLM, SpanCorruption, step_generator
from ltk.training.presets import get_preset


def _train(tiny_corpus, out, preset, steps, *extra):
    argv = ["train", "--preset", preset, "--data", str(tiny_corpus), "--out", str(out), "--max-steps", str(steps),
            "--data.vocab_size", "300", "--data.min_chars", "16", "--trainer.batch_size", "4",
            "--trainer.seq_len", "32", "--trainer.eval_every", "0", "--trainer.eval_batches", "1",
            "--trainer.log_every", "1", "--trainer.progress", "false", "--optim.warmup_steps", "5", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["llama-debug", "bert-debug", "t5-debug"])
def test_family_trains_from_the_cli_and_its_loss_falls(preset, tiny_corpus, tmp_path):
    m = _train(tiny_corpus, tmp_path / preset, preset, 25)
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert "val_loss" in m[-1]
    assert ("val_bpb" in m[-1]) == (preset == "llama-debug")  # bits per byte only for next-token prediction
    cfg = RunConfig.from_dict(load_checkpoint(tmp_path / preset).state["config"])
    assert cfg.family == preset.split("-")[0] and type(cfg.model) is type(get_preset(preset).model)


@pytest.mark.parametrize("preset", ["bert-debug", "t5-debug"])
def test_resume_is_bitwise_for_randomized_objectives(preset, tiny_corpus, tmp_path):
    extra = ["--optim.decay_steps", "20"]
    _train(tiny_corpus, tmp_path / "full", preset, 6, *extra)
    _train(tiny_corpus, tmp_path / "split", preset, 3, *extra)
    assert main(["train", "--resume", str(tmp_path / "split"), "--max-steps", "6"]) == 0
    a, b = load_checkpoint(tmp_path / "full").model, load_checkpoint(tmp_path / "split").model
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_objectives_reserve_ids_above_the_tokenizer():
    x = torch.randint(1, 50, (3, 40))
    mlm = MaskedLM(50, 0)
    inputs, labels = mlm.forward(lambda t: t, x, step_generator(0, 0, 0, 0))
    assert (inputs == 50).any() and inputs.max() <= 50 and ((labels == -100) | (labels == x)).all()
    t5 = SpanCorruption(50, 0)
    enc, enc_mask, dec, dec_mask, labels = t5.batch(x, step_generator(0, 0, 0, 0))
    assert set(t5.sentinels) == set(range(51, 151)) and t5.pad_id == 50
    assert (dec[:, 0] == 50).all() and enc_mask.sum(1).min() > 0
    used = enc[enc_mask]
    assert used.max() < 151 and ((used < 50) | (used > 50)).all()  # the pad id only pads
