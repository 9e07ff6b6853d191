"""Sharded checkpoints (ltk/training/sharded_checkpoint.py): a multi-process run writes one file of
boxes per rank, and any other layout resumes from it, continuing with the losses of one
uninterrupted process. Tiny GPT (as tests/distributed/test_parallel_trainer.py: no biases, dropout 0)."""
import json

import pytest
import torch

from ltk.models.gpt import GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.trainer import Trainer

TIMEOUT = 240


def _config(corpus, out, strategy="auto", steps=5, tp=1, pp=1):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=301, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=20),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=0, eval_batches=2, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=2, ckpt_every=0))
    cfg.model.backend = "torch"
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.pp = strategy, tp, pp
    return cfg


def _runs(rank, world, jobs):
    """Worker: each (config, checkpoint to resume or None) in turn, in this process group."""
    for cfg, ckpt in jobs:
        Trainer(cfg, resume=load_checkpoint(ckpt) if ckpt else None).fit()


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _same_losses(single, run):
    a, b = _losses(single), _losses(run)
    assert set(b) == set(a)
    for step, loss in a.items():
        assert b[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    spawn(_runs, 1, [(_config(tiny_corpus, out), None)], timeout_s=TIMEOUT)
    return out


def test_zero3_at_4_ranks_resumes_as_zero2_at_2_and_as_one_process(single, tiny_corpus, tmp_path):
    first = _config(tiny_corpus, tmp_path / "z3", "zero3", steps=3)
    spawn(_runs, 4, [(first, None)], timeout_s=TIMEOUT)
    ckpt = list_checkpoints(tmp_path / "z3")[-1]
    assert sorted(p.name for p in ckpt.glob("rank_*")) == [f"rank_{r:05d}.safetensors" for r in range(4)]
    assert not (ckpt / "model.safetensors").exists()  # nobody consolidated
    index = json.loads((ckpt / "index.json").read_text())
    assert len(index["tensors"]["wte.weight"]["kinds"]["exp_avg"]["chunks"]) > 1  # a flat shard, in boxes
    for run, world in (("z2", 2), ("one", 1)):
        (tmp_path / run).mkdir()
        import shutil
        shutil.copytree(tmp_path / "z3" / "checkpoints", tmp_path / run / "checkpoints")
        (tmp_path / run / "metrics.jsonl").write_text((tmp_path / "z3" / "metrics.jsonl").read_text())
        cont = _config(tiny_corpus, tmp_path / run, "zero2" if world == 2 else "auto")
        spawn(_runs, world, [(cont, str(tmp_path / run / "checkpoints" / ckpt.name))], timeout_s=TIMEOUT)
        _same_losses(single, tmp_path / run)
    # single-process readers consolidate the sharded form: the same weights as the resumed run's
    a, b = load_checkpoint(tmp_path / "one").model, load_checkpoint(single).model
    for k in a:
        assert ((a[k] - b[k]).norm() / b[k].norm()).item() <= 1e-5, k
    opt = load_checkpoint(tmp_path / "z3").trainer["optimizer"]
    assert opt["state"]["h.0.mlp.c_fc.weight"]["exp_avg"].shape == (128, 32)
    assert float(opt["state"]["h.0.mlp.c_fc.weight"]["step"]) == 3


def test_tp_then_zero3_then_pp_then_ddp_at_2_ranks(single, tiny_corpus, tmp_path):
    """One run, each step range under another layout: tp 2 (fused qkv boxes, padded vocabulary
    rows left out), ZeRO-3, pp 2 (the tied head's copy read, not written), ddp."""
    run = tmp_path / "run"
    jobs, ckpt = [], None
    for steps, (strategy, tp, pp) in zip((2, 3, 4, 5), (("auto", 2, 1), ("zero3", 1, 1), ("auto", 1, 2),
                                                      ("ddp", 1, 1))):
        jobs.append((_config(tiny_corpus, run, strategy, steps, tp, pp), ckpt))
        ckpt = str(run / "checkpoints" / f"step_{steps:06d}")
    spawn(_runs, 2, jobs, timeout_s=TIMEOUT)
    _same_losses(single, run)


def test_a_damaged_shard_is_refused_by_name(single, tiny_corpus, tmp_path):
    spawn(_runs, 2, [(_config(tiny_corpus, tmp_path / "run", "zero2", steps=1), None)], timeout_s=TIMEOUT)
    ckpt = load_checkpoint(tmp_path / "run")  # the small files verified; shards when read
    shard = ckpt.path / "rank_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in .*rank_00001\.safetensors"):
        load_checkpoint(tmp_path / "run").model
    assert torch.is_tensor(load_checkpoint(single).model["wte.weight"])
