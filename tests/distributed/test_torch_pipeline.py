"""torch.distributed.pipelining behind `--parallel.pp_engine torch` (`--parallel torch-pp`;
ltk/parallel/torch_pipeline.py): the training loop with PyTorch's GPipe, 1F1B and interleaved
1F1B schedules on 2 gloo processes, and pp 2 x dp 2 on 4, trains the same model as one process
(losses within 1e-5 for 20 steps, same validation loss and weights); a run it saved resumes
under the lab's executor, and the other way round."""
import pytest
from engine_runs import same_run, train_jobs

from ltk.models.gpt import GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.config_check import ConfigError, check_run

TIMEOUT = 300
STEPS = 20
RUNS = {"gpipe": (2, dict(schedule="gpipe")), "1f1b": (2, dict(schedule="1f1b")),
        "interleaved": (2, dict(schedule="interleaved", virtual=2)), "1f1b-dp2": (4, dict(schedule="1f1b"))}


def _config(corpus, out, pp=1, engine="ltk", schedule="1f1b", virtual=1, steps=STEPS):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=4, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=40),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=10, eval_batches=4, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=2, ckpt_every=10))
    cfg.model.backend = "torch"
    p = cfg.parallel
    p.pp, p.pp_engine, p.schedule, p.virtual_stages = pp, engine, schedule, virtual
    return cfg


def _same(single, run):
    same_run(single, run, STEPS)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-pp")
    spawn(train_jobs, 1, [(_config(tiny_corpus, root / "single"), None)], timeout_s=TIMEOUT)
    halves = [(_config(tiny_corpus, root / "torch-then-ltk", 2, "torch", steps=STEPS // 2), None),
              (_config(tiny_corpus, root / "ltk-then-torch", 2, "ltk", steps=STEPS // 2), None)]
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / n, 2, "torch", **kw), None) for n, (w, kw) in RUNS.items()
                      if w == 2] + halves, timeout_s=TIMEOUT)
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / "torch-then-ltk", 2, "ltk"),
                       str(load_checkpoint(root / "torch-then-ltk").path)),
                      (_config(tiny_corpus, root / "ltk-then-torch", 2, "torch"),
                       str(load_checkpoint(root / "ltk-then-torch").path))], timeout_s=TIMEOUT)
    spawn(train_jobs, 4, [(_config(tiny_corpus, root / n, 2, "torch", **kw), None) for n, (w, kw) in RUNS.items()
                      if w == 4], timeout_s=TIMEOUT)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_torch_schedules_equal_one_process(runs, name):
    _same(runs / "single", runs / name)


def test_torch_pipeline_checkpoints_resume_under_either_executor(runs):
    _same(runs / "single", runs / "torch-then-ltk")
    _same(runs / "single", runs / "ltk-then-torch")


def test_torch_engine_needs_a_pipeline(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match="needs --parallel.pp > 1"):
        check_run(_config(tiny_corpus, tmp_path / "x", 1, "torch"), world=2, size=False, warn=False)


def test_torch_engine_needs_a_micro_batch_per_stage(tiny_corpus, tmp_path):
    cfg = _config(tiny_corpus, tmp_path / "x", 4, "torch")  # grad_accum 2 < 4 stages
    with pytest.raises(ConfigError, match="needs at least as many micro-batches as stages"):
        check_run(cfg, world=4, size=False, warn=False)
