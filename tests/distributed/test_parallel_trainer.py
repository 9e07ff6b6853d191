"""The training loop under every strategy of ltk/parallel/: `Trainer` on 2 and 4 gloo processes
trains the same model as one process with the same global batch — same per-step losses, same
validation loss, same final weights — and its checkpoint (single-process format, optimizer
state by parameter name) resumes on another world size.

The model has no biases: GPT's key bias has an exactly zero gradient (softmax is unchanged by
adding the same amount to every score of a row), so each rank sees only rounding noise there,
and Adam — which divides by the gradient's own scale — turns any noise into a full ±lr step.
Any change in summation order (which a parallel reduction is) then moves it differently."""
import json

import pytest

from ltk.models.gpt import GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.trainer import Trainer

TIMEOUT = 180


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _config(corpus, out, strategy="auto", tp=1, steps=5, grad_accum=1, pp=1, schedule="1f1b", virtual=1):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=20),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=steps, eval_batches=4, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=grad_accum, ckpt_every=0))
    cfg.model.backend = "torch"
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.pp = strategy, tp, pp
    cfg.parallel.schedule, cfg.parallel.virtual_stages = schedule, virtual
    return cfg


def _train(rank, world, cfgs):
    """Worker: train each config in turn in this group; rank 0 returns the run folders."""
    out = []
    for cfg in cfgs:
        trainer = Trainer(cfg)
        trainer.fit()
        out.append(str(trainer.run_dir))
    return out


def _compare(single, run, tol=1e-5):
    a, b = _metrics(single), _metrics(run)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        assert ma["tokens"] == mb["tokens"]
        assert mb["loss"] == pytest.approx(ma["loss"], rel=tol, abs=tol)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=tol, abs=tol)
    _same_weights(load_checkpoint(single).model, load_checkpoint(run).model)


def _same_weights(wa, wb, tol=1e-5):
    """Norm-wise relative error ‖b − a‖ / ‖a‖ ≤ 1e-5 for every tensor (an element whose
    gradient is tiny can still move by a few 1e-6 under Adam when the reduction order changes)."""
    assert set(wb) <= set(wa) and set(wa) - set(wb) <= {"lm_head.weight"}  # a tied alias may be saved once
    for k in wb:
        err = ((wb[k] - wa[k]).norm() / wa[k].norm()).item()
        assert err <= tol, (k, err)


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    # one process, but spawned like the others: one thread each, so matmuls round alike
    spawn(_train, 1, [_config(tiny_corpus, path / "run", grad_accum=2)], timeout_s=TIMEOUT)
    return path / "run"


@pytest.mark.parametrize("world", [2, 4])
def test_every_engine_equals_one_process(world, single, tiny_corpus, tmp_path):
    strategies = (["torch-ddp", "ddp", "naive-ddp", "zero1", "zero2", "zero3"] if world == 2
                  else ["ddp", "zero2", "zero3"])
    cfgs = [_config(tiny_corpus, tmp_path / s, strategy=s, grad_accum=2) for s in strategies]
    spawn(_train, world, cfgs, timeout_s=TIMEOUT)
    for s in strategies:
        _compare(single, tmp_path / s)


def test_tensor_parallel_and_dp_x_tp_equal_one_process(single, tiny_corpus, tmp_path):
    cfgs = [_config(tiny_corpus, tmp_path / "tp2", tp=2, grad_accum=2)]
    spawn(_train, 2, cfgs, timeout_s=TIMEOUT)
    cfgs = [_config(tiny_corpus, tmp_path / "dp2tp2", strategy="ddp", tp=2, grad_accum=2),
            _config(tiny_corpus, tmp_path / "zero1tp2", strategy="zero1", tp=2, grad_accum=2),
            _config(tiny_corpus, tmp_path / "zero3tp2", strategy="zero3", tp=2, grad_accum=2)]
    spawn(_train, 4, cfgs, timeout_s=TIMEOUT)
    for name in ("tp2", "dp2tp2", "zero1tp2", "zero3tp2"):
        _compare(single, tmp_path / name)
    # ZeRO-3 x TP: the clipped norm is the global one (its gradients live in the units' shards,
    # not in .grad), and evaluation and the checkpoint gathered the sharded weights (_compare)
    for a, b in zip(_metrics(single), _metrics(tmp_path / "zero3tp2")):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def _resume(rank, world, cfg, ckpt_dir):
    from ltk.training.checkpoint import load_checkpoint as load

    trainer = Trainer(cfg, resume=load(ckpt_dir))
    trainer.fit()
    return str(trainer.run_dir)


def test_zero_checkpoint_resumes_on_another_world_size(single, tiny_corpus, tmp_path):
    """3 steps of ZeRO-2 on 2 ranks, saved; 2 more of ZeRO-3 on 4 ranks == 5 steps of one process."""
    first = _config(tiny_corpus, tmp_path / "run", strategy="zero2", grad_accum=2)
    first.trainer.max_steps = 3
    spawn(_train, 2, [first], timeout_s=TIMEOUT)
    ckpt = load_checkpoint(tmp_path / "run")
    cont = _config(tiny_corpus, tmp_path / "run", strategy="zero3", grad_accum=2)
    spawn(_resume, 4, cont, str(ckpt.path), timeout_s=TIMEOUT)
    a, b = _metrics(single), _metrics(tmp_path / "run")
    by_step = {m["step"]: m for m in b}
    for m in a:
        assert by_step[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-5)
    _same_weights(load_checkpoint(single).model, load_checkpoint(tmp_path / "run").model)


def test_tensor_parallel_checkpoint_resumes_with_another_mesh(single, tiny_corpus, tmp_path):
    """3 steps on dp 2 x tp 2 (moments gathered from the tp shards into a single-process
    checkpoint), 2 more on tp 2 alone (moments cut again) == 5 steps of one process."""
    first = _config(tiny_corpus, tmp_path / "run", strategy="zero1", tp=2, grad_accum=2)
    first.trainer.max_steps = 3
    spawn(_train, 4, [first], timeout_s=TIMEOUT)
    ckpt = load_checkpoint(tmp_path / "run")
    assert tuple(ckpt.trainer["optimizer"]["state"]["h.0.mlp.c_fc.weight"]["exp_avg"].shape) == (128, 32)  # full size
    cont = _config(tiny_corpus, tmp_path / "run", tp=2, grad_accum=2)
    spawn(_resume, 2, cont, str(ckpt.path), timeout_s=TIMEOUT)
    by_step = {m["step"]: m for m in _metrics(tmp_path / "run")}
    for m in _metrics(single):
        assert by_step[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-5)
    _same_weights(load_checkpoint(single).model, load_checkpoint(tmp_path / "run").model)


def test_pipeline_and_pp_x_dp_equal_one_process(single, tiny_corpus, tmp_path):
    cfgs = [_config(tiny_corpus, tmp_path / "pp2", pp=2, grad_accum=2)]
    spawn(_train, 2, cfgs, timeout_s=TIMEOUT)
    cfgs = [_config(tiny_corpus, tmp_path / "pp2dp2", pp=2, schedule="gpipe", grad_accum=2)]
    spawn(_train, 4, cfgs, timeout_s=TIMEOUT)
    for name in ("pp2", "pp2dp2"):
        _compare(single, tmp_path / name)

