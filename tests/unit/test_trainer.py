import json

import pytest
import torch

from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import OptimConfig, RunConfig
from ltk.training.optim import lr_at
from ltk.training.trainer import Trainer


def _params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_exact_resume_is_bitwise(tiny_config, tmp_path, grad_accum):
    """N steps + resume + N steps == 2N steps, bit for bit (dropout on, so RNG matters)."""
    full = Trainer(tiny_config(tmp_path / "full", max_steps=8, grad_accum=grad_accum))
    full.fit()

    first = tiny_config(tmp_path / "split", max_steps=4, grad_accum=grad_accum)
    Trainer(first).fit()
    ck = load_checkpoint(tmp_path / "split")
    assert ck.state["step"] == 4
    cfg = RunConfig.from_dict(ck.state["config"])
    cfg.trainer.max_steps = 8
    resumed = Trainer(cfg, resume=ck)
    resumed.fit()

    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [m["loss"] for m in _metrics(tmp_path / "full")]
    lb = [m["loss"] for m in _metrics(tmp_path / "split")]
    assert la == lb  # the resumed run appended steps 5..8 to the same log


def test_training_reduces_loss_and_writes_run_folder(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=30, eval_every=10, log_every=5)
    cfg.model.dropout = 0.0
    result = Trainer(cfg).fit()
    m = _metrics(tmp_path / "run")
    assert [r["step"] for r in m if "val_loss" in r] == [10, 20, 30]
    assert all({"step", "loss", "tokens_per_s"} <= r.keys() for r in m)
    assert m[-1]["loss"] < m[0]["loss"] - 0.5
    assert 0 < m[-1]["val_bpb"] < 8
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "summary.json").exists()
    assert (result.checkpoint / "tokenizer.json").exists()


def test_seq_len_longer_than_positions_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(seq_len=64)  # model.block_size is 32
    with pytest.raises(ValueError, match="larger than the model's positions"):
        Trainer(cfg)


def test_missing_data_path_is_named(tiny_config, tmp_path):
    cfg = tiny_config()
    cfg.data.source = str(tmp_path / "no-such-corpus")
    with pytest.raises(FileNotFoundError, match="no-such-corpus"):
        Trainer(cfg)


def test_vocab_larger_than_model_is_refused(tiny_config):
    cfg = tiny_config()
    cfg.model.vocab_size = 100  # the tokenizer has 300
    with pytest.raises(ValueError, match="tokenizer has 300 tokens"):
        Trainer(cfg)


def test_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_steps=110)
    assert lr_at(0, cfg, 1000) == pytest.approx(0.1)
    assert lr_at(9, cfg, 1000) == pytest.approx(1.0)
    assert lr_at(60, cfg, 1000) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg, 1000) == pytest.approx(0.1)
    assert lr_at(500, cfg, 1000) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 1000) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
