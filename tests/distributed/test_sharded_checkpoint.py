"""Sharded checkpoints (ltk/training/sharded_checkpoint.py): a multi-process run writes one file of
boxes per rank, and any other layout resumes from it, continuing with the losses of one
uninterrupted process. Tiny GPT as in tests/distributed/test_parallel_trainer.py (no biases,
dropout 0), with a vocabulary of 301 so that tensor parallelism pads it (to 2 x 151 rows).

Made once by the module fixture: ZeRO-3 on 4 ranks saves step 3; one process (this one) trains 5
steps uninterrupted and resumes the ZeRO-3 checkpoint; 2 ranks resume it as ZeRO-2, and train
one run whose steps go tp 2 -> ZeRO-3 -> pp 2 -> ddp, a checkpoint between each, and a GPT with
biases for one step of ZeRO-3, exported to a Hugging Face folder; and bf16 mixed precision
under ddp and pp 2, each 5 steps uninterrupted and 3 + a resume to 5."""
import json
import shutil

import pytest
import torch

from ltk.models.gpt import GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import CheckpointError, load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.trainer import Trainer

TIMEOUT = 240
CHAIN = ((2, "auto", 2, 1), (3, "zero3", 1, 1), (4, "auto", 1, 2), (5, "ddp", 1, 1))  # (to step, strategy, tp, pp)


def _config(corpus, out, strategy="auto", steps=5, tp=1, pp=1):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=301, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=20),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=0, eval_batches=2, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=2, ckpt_every=0, keep_last=0))
    cfg.model.backend = "torch"
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.pp = strategy, tp, pp
    return cfg


def _runs(rank, world, jobs):
    """Worker: each (config, checkpoint to resume or None) in turn, in this process group."""
    for cfg, ckpt in jobs:
        Trainer(cfg, resume=load_checkpoint(ckpt) if ckpt else None).fit()


def _fork(src, dst):
    """A copy of run folder src (checkpoints and metrics) to resume elsewhere."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copyfile(src / "metrics.jsonl", dst / "metrics.jsonl")
    return str(dst / "checkpoints" / "step_000003")


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    spawn(_runs, 4, [(_config(tiny_corpus, root / "z3", "zero3", steps=3), None)], timeout_s=TIMEOUT)
    one = [(_config(tiny_corpus, root / "single"), None),
           (_config(tiny_corpus, root / "one"), _fork(root / "z3", root / "one"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in this process, one thread as a spawned rank has: matmuls round alike
    try:
        _runs(0, 1, one)
    finally:
        torch.set_num_threads(threads)
    two, ckpt = [(_config(tiny_corpus, root / "z2", "zero2"), _fork(root / "z3", root / "z2"))], None
    for steps, strategy, tp, pp in CHAIN:
        two.append((_config(tiny_corpus, root / "chain", strategy, steps, tp, pp), ckpt))
        ckpt = str(root / "chain" / "checkpoints" / f"step_{steps:06d}")
    gpt2 = _config(tiny_corpus, root / "gpt2", "zero3", steps=1)
    gpt2.model.bias = True  # transformers' GPT-2 has biases
    for name, strategy, pp in (("ddp", "ddp", 1), ("pp", "auto", 2)):
        whole, first, cont = (_config(tiny_corpus, root / f"bf16-{name}{tag}", strategy, steps, pp=pp)
                              for tag, steps in (("-whole", 5), ("", 3), ("", 5)))
        for cfg in (whole, first, cont):
            cfg.trainer.dtype = "bf16"
        two += [(whole, None), (first, None), (cont, str(root / f"bf16-{name}" / "checkpoints" / "step_000003"))]
    spawn(_runs, 2, two + [(gpt2, None)], timeout_s=TIMEOUT)
    return root


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("run", ["z2", "one", "chain"])
def test_every_resume_continues_the_uninterrupted_losses(runs, run):
    """ZeRO-3 at 4 ranks -> ZeRO-2 at 2 and -> 1 process; tp -> ZeRO-3 -> pp -> ddp at 2."""
    a, b = _losses(runs / "single"), _losses(runs / run)
    assert sorted(b) == sorted(a) == [1, 2, 3, 4, 5]
    for step, loss in a.items():
        assert b[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


@pytest.mark.parametrize("engine", ["ddp", "pp"])
def test_a_bf16_run_resumes_exactly(runs, engine):
    """Mixed precision: the checkpoint holds the fp32 masters and their moments (not the bf16
    weights), so 3 steps + a resume to 5 are the 5 uninterrupted steps, loss for loss."""
    a, b = _losses(runs / f"bf16-{engine}-whole"), _losses(runs / f"bf16-{engine}")
    assert sorted(b) == sorted(a) == [1, 2, 3, 4, 5]
    assert b == a
    index = json.loads((runs / f"bf16-{engine}" / "checkpoints" / "step_000003" / "index.json").read_text())
    assert index["tensors"]["wte.weight"]["kinds"]["param"]["dtype"] == "float32"


def test_each_rank_writes_its_boxes_and_nobody_consolidates(runs):
    ckpt = runs / "z3" / "checkpoints" / "step_000003"
    assert sorted(p.name for p in ckpt.glob("rank_*")) == [f"rank_{r:05d}.safetensors" for r in range(4)]
    assert not (ckpt / "model.safetensors").exists()
    tensors = json.loads((ckpt / "index.json").read_text())["tensors"]
    assert set(tensors["wte.weight"]["kinds"]) == {"param", "exp_avg", "exp_avg_sq"}
    assert len(tensors["wte.weight"]["kinds"]["exp_avg"]["chunks"]) > 1  # a flat shard cut into boxes
    assert "lm_head.weight" not in tensors  # tied: written once, as wte
    tp = json.loads((runs / "chain" / "checkpoints" / "step_000002" / "index.json").read_text())["tensors"]
    qkv = tp["h.0.attn.c_attn.weight"]["kinds"]["param"]["chunks"]
    assert sorted(c["offsets"][0] for c in qkv) == [0, 16, 32, 48, 64, 80]  # q, k, v: 3 pieces per rank
    assert sorted((c["offsets"][0], c["sizes"][0]) for c in tp["wte.weight"]["kinds"]["param"]["chunks"]) \
        == [(0, 151), (151, 150)]  # the padding row of rank 1 is not saved
    assert len(tp["ln_f.weight"]["kinds"]["param"]["chunks"]) == 1  # replicated: written by one rank


def test_single_process_readers_consolidate_the_sharded_form(runs):
    ckpt = load_checkpoint(runs / "z3")
    opt = ckpt.trainer["optimizer"]["state"]["h.0.mlp.c_fc.weight"]
    assert opt["exp_avg"].shape == (128, 32) and float(opt["step"]) == 3
    a, b = load_checkpoint(runs / "chain").model, load_checkpoint(runs / "single").model
    assert a.keys() == b.keys()
    for k in a:
        assert ((a[k] - b[k]).norm() / b[k].norm()).item() <= 1e-5, k


def test_a_damaged_shard_is_refused_by_name(runs, tmp_path):
    shutil.copytree(runs / "z3" / "checkpoints", tmp_path / "checkpoints")
    shard = tmp_path / "checkpoints" / "step_000003" / "rank_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    ckpt = load_checkpoint(tmp_path)  # the small files are verified at once, each shard before it is read
    with pytest.raises(CheckpointError, match=r"checksum mismatch in .*rank_00002\.safetensors"):
        ckpt.model
    assert torch.is_tensor(load_checkpoint(runs / "z3").model["wte.weight"])


def test_a_sharded_checkpoint_exports_to_a_folder_transformers_loads(runs, tmp_path):
    """`ltk export RUN --hf OUT` from a ZeRO-3 checkpoint: GPT2LMHeadModel gives our logits."""
    from ltk.models.gpt import GPT
    from ltk.training.checkpoint import restore_model
    from ltk.training.config_file import config_from_dict
    from ltk.training.export_hf import export_hf

    tf = pytest.importorskip("transformers")
    ckpt = load_checkpoint(runs / "gpt2")
    ours = GPT(config_from_dict(ckpt.state["config"], ckpt.path / "state.json").model).eval()
    restore_model(ours, ckpt.model)
    out = export_hf(runs / "gpt2", tmp_path / "hf")
    assert (out / "tokenizer.json").exists()
    theirs = tf.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 301, (2, 16))
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-5
