"""`ltk train --parallel ddp --nproc 2` (torchrun underneath, 2 CPU processes on gloo, our
bucketed DDP) trains the same model as one process with the same global batch: same losses,
same validation loss, same weights. The other strategies are checked in-process by
tests/distributed/test_parallel_trainer.py; this one checks the launcher end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ltk.training.checkpoint import load_checkpoint
from ltk.training.trainer import Trainer


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_equals_single_process(tiny_config, tmp_path):
    single = tiny_config(tmp_path / "single", max_steps=5, batch_size=4, eval_every=5)
    single.model.dropout = 0.0
    Trainer(single).fit()

    cfg = tiny_config(tmp_path / "ddp")
    overrides = [
        "--data", cfg.data.source, "--out", str(tmp_path / "ddp"), "--max-steps", "5",
        "--model.vocab_size", "0", "--model.block_size", "32", "--model.n_layer", "2", "--model.n_head", "2",
        "--model.n_embd", "32", "--model.dropout", "0", "--data.vocab_size", "300", "--data.min_chars", "16",
        "--data.val_fraction", "0.1", "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--optim.decay_steps", "20",
        "--trainer.batch_size", "4", "--trainer.eval_every", "5", "--trainer.eval_batches", "2",
        "--trainer.log_every", "1", "--trainer.progress", "false", "--trainer.seed", "7",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ltk.cli", "train", "--parallel", "ddp", "--nproc", "2", *overrides],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        assert ma["tokens"] == mb["tokens"]
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], abs=1e-5)
    wa = load_checkpoint(tmp_path / "single").model
    wb = load_checkpoint(tmp_path / "ddp").model
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4, msg=k)
