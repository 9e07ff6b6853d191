"""The training loop under every strategy of ltk/parallel/: `Trainer` on 2 and 4 gloo processes
trains the same model as one process with the same global batch — same per-step losses, same
validation loss, same final weights — and its checkpoint (single-process format, optimizer
state by parameter name) resumes on another world size.

Starting a group costs seconds (every rank imports torch), a tiny run a fraction of that, so
every run is planned up front (RUNS) and each world size starts once: 1 process (the
reference), 2 (every 2-rank layout, and the first half of the ZeRO resume), 4 (every 4-rank
layout, the second half of the ZeRO resume, the first half of the TP resume), then 2 again
(the second half of the TP resume). The tests below only read the run folders.

The model has no biases: GPT's key bias has an exactly zero gradient (softmax is unchanged by
adding the same amount to every score of a row), so each rank sees only rounding noise there,
and Adam — which divides by the gradient's own scale — turns any noise into a full ±lr step.
Any change in summation order (which a parallel reduction is) then moves it differently."""
import pytest
from engine_runs import metrics, same_weights, train_jobs

from ltk.models.gpt import GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig

TIMEOUT = 300
ENGINES = {2: ["torch-ddp", "ddp", "naive-ddp", "zero1", "zero2", "zero3"], 4: ["ddp", "zero2", "zero3"]}
# name -> (world, config overrides); every run takes 2 micro-batches per step
RUNS = {
    **{f"{s}-w{w}": (w, dict(strategy=s)) for w, names in ENGINES.items() for s in names},
    "tp2": (2, dict(tp=2)),
    "dp2tp2": (4, dict(strategy="ddp", tp=2)),
    "zero1tp2": (4, dict(strategy="zero1", tp=2)),
    "zero3tp2": (4, dict(strategy="zero3", tp=2)),
    "pp2": (2, dict(pp=2)),
    "pp2dp2": (4, dict(pp=2, schedule="gpipe")),
}


def _config(corpus, out, strategy="auto", tp=1, steps=5, grad_accum=2, pp=1, schedule="1f1b", virtual=1):
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


def _compare(single, run, tol=1e-5):
    a, b = metrics(single), metrics(run)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        assert ma["tokens"] == mb["tokens"]
        assert mb["loss"] == pytest.approx(ma["loss"], rel=tol, abs=tol)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=tol, abs=tol)
    same_weights(load_checkpoint(single).model, load_checkpoint(run).model)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """Every run of the module, one group per world size (and one more for the last resume);
    returns the folders by name: 'single', the RUNS, 'zero-resume', 'tp-resume' and 'tp-saved'
    (the checkpoint written on dp 2 x tp 2)."""
    root = tmp_path_factory.mktemp("parallel")
    cfg = {name: _config(tiny_corpus, root / name, **kw) for name, (_, kw) in RUNS.items()}
    # one process, but spawned like the others: one thread each, so matmuls round alike
    spawn(train_jobs, 1, [(_config(tiny_corpus, root / "single"), None)], timeout_s=TIMEOUT)
    # ZeRO-2 on 2 ranks for 3 steps, saved; ZeRO-3 on 4 ranks continues it to 5
    zero_first = _config(tiny_corpus, root / "zero-resume", strategy="zero2")
    zero_first.trainer.max_steps = 3
    spawn(train_jobs, 2, [(cfg[n], None) for n, (w, _) in RUNS.items() if w == 2] + [(zero_first, None)],
          timeout_s=TIMEOUT)
    zero_ckpt = str(load_checkpoint(root / "zero-resume").path)
    # dp 2 x tp 2 (ZeRO-1) for 3 steps, saved; tp 2 alone continues it to 5
    tp_first = _config(tiny_corpus, root / "tp-resume", strategy="zero1", tp=2)
    tp_first.trainer.max_steps = 3
    spawn(train_jobs, 4, [(cfg[n], None) for n, (w, _) in RUNS.items() if w == 4]
          + [(_config(tiny_corpus, root / "zero-resume", strategy="zero3"), zero_ckpt), (tp_first, None)],
          timeout_s=TIMEOUT)
    tp_ckpt = str(load_checkpoint(root / "tp-resume").path)
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / "tp-resume", tp=2), tp_ckpt)], timeout_s=TIMEOUT)
    return {"tp-saved": tp_ckpt, **{name: root / name for name in [*RUNS, "single", "zero-resume", "tp-resume"]}}


@pytest.mark.parametrize("world", [2, 4])
def test_every_engine_equals_one_process(world, runs):
    for s in ENGINES[world]:
        _compare(runs["single"], runs[f"{s}-w{world}"])


def test_tensor_parallel_and_dp_x_tp_equal_one_process(runs):
    for name in ("tp2", "dp2tp2", "zero1tp2", "zero3tp2"):
        _compare(runs["single"], runs[name])
    # ZeRO-3 x TP: the clipped norm is the global one (its gradients live in the units' shards,
    # not in .grad), and evaluation ran on the sharded model (_compare)
    for a, b in zip(metrics(runs["single"]), metrics(runs["zero3tp2"])):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def _resumed_equals_one_process(single, run):
    by_step = {m["step"]: m for m in metrics(run)}
    for m in metrics(single):
        assert by_step[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-5)
    same_weights(load_checkpoint(single).model, load_checkpoint(run).model)


def test_zero_checkpoint_resumes_on_another_world_size(runs):
    """3 steps of ZeRO-2 on 2 ranks, saved; 2 more of ZeRO-3 on 4 ranks == 5 steps of one process."""
    _resumed_equals_one_process(runs["single"], runs["zero-resume"])


def test_tensor_parallel_checkpoint_resumes_with_another_mesh(runs):
    """3 steps on dp 2 x tp 2 (moments gathered from the tp shards into a single-process
    checkpoint), 2 more on tp 2 alone (moments cut again) == 5 steps of one process."""
    ckpt = load_checkpoint(runs["tp-saved"])
    assert ckpt.state["step"] == 3
    assert tuple(ckpt.trainer["optimizer"]["state"]["h.0.mlp.c_fc.weight"]["exp_avg"].shape) == (128, 32)  # full size
    _resumed_equals_one_process(runs["single"], runs["tp-resume"])


def test_pipeline_and_pp_x_dp_equal_one_process(runs):
    for name in ("pp2", "pp2dp2"):
        _compare(runs["single"], runs[name])
