"""A context-parallel run resumes on another layout: the checkpoint holds the model, not its
sequence split (ltk/training/resume.py lets the parallel layout change), so a run saved at step 2
by ring attention over 2 ranks (zig-zag chunks) continues under Ulysses with contiguous chunks
next to ZeRO-2, and on one process, with the uninterrupted run's losses at steps 3 and 4 (within
1e-5: the sums run in another order) and its validation loss."""
from __future__ import annotations

import pytest
from engine_runs import by_step, train_jobs

from ltk.models.llama import LlamaConfig
from ltk.parallel.dist import spawn
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig

TIMEOUT, STEPS, HALF = 300, 4, 2


def _config(corpus, out, **parallel) -> RunConfig:
    model = LlamaConfig(vocab_size=0, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                        intermediate_size=64, rope_theta=10000.0, backend="torch")
    cfg = RunConfig(name="cp-resume", family="llama", model=model,
                    data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
                    optim=OptimConfig(lr=3e-3, warmup_steps=1, decay_steps=STEPS),
                    trainer=TrainerConfig(max_steps=STEPS, batch_size=4, eval_every=STEPS, eval_batches=2,
                                          log_every=1, out_dir=str(out), progress=False, seed=5, ckpt_every=HALF,
                                          keep_last=0, timeline=False))
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_resume")
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / "ring", cp=2, strategy="ddp"), None)], timeout_s=TIMEOUT)
    half = root / "ring" / "checkpoints" / f"step_{HALF:06d}"
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / "ulysses", cp=2, cp_impl="ulysses", cp_layout="contiguous",
                                   strategy="zero2"), half)], timeout_s=TIMEOUT)
    spawn(train_jobs, 1, [(_config(tiny_corpus, root / "one"), half)], timeout_s=TIMEOUT)
    return root


@pytest.mark.parametrize("resumed", ["ulysses", "one"])
def test_resume_on_another_layout_continues_the_run(runs, resumed):
    whole, b = by_step(runs / "ring"), by_step(runs / resumed)
    assert sorted(b) == list(range(HALF + 1, STEPS + 1))
    for step, row in b.items():
        assert row["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5, abs=1e-5), step
        assert row["tokens"] == whole[step]["tokens"]
    assert b[STEPS]["val_loss"] == pytest.approx(whole[STEPS]["val_loss"], rel=1e-5, abs=1e-5)
