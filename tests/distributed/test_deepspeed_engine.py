"""DeepSpeed ZeRO behind `--parallel deepspeed-zero1|2|3` (ltk/parallel/deepspeed_engine.py): the
training loop on 2 gloo processes trains the same model as one process (losses within 1e-5 for 20
steps, same validation loss and final weights), resumes exactly (N + resume + N == 2N), and its
checkpoint — the lab's sharded format, written through DeepSpeed's fragment API — resumes under
our own ZeRO-3 and loads in one process. Skipped where DeepSpeed is not installed (it is an
optional extra: pip install -e '.[baselines]')."""
import importlib.util

import pytest
from engine_runs import same_run, train_jobs

from ltk.models.gpt import GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.config_check import ConfigError, check_run

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install -e '.[baselines]')")
TIMEOUT = 600
STEPS = 20


def _config(corpus, out, strategy="auto", steps=STEPS):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=40, grad_clip=0.5),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=10, eval_batches=4, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=2, ckpt_every=10))
    cfg.model.backend = "torch"
    cfg.parallel.strategy = strategy
    return cfg


def _same(single, run):
    same_run(single, run, STEPS, grad_norm_tol=1e-4)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    spawn(train_jobs, 1, [(_config(tiny_corpus, root / "single"), None)], timeout_s=TIMEOUT)
    half = _config(tiny_corpus, root / "ds3-resume", "deepspeed-zero3", steps=STEPS // 2)
    cross = _config(tiny_corpus, root / "cross", "deepspeed-zero2", steps=STEPS // 2)
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / f"ds{s}", f"deepspeed-zero{s}"), None) for s in (1, 2, 3)]
          + [(half, None), (cross, None)], timeout_s=TIMEOUT)
    # the second halves: DeepSpeed continues its own checkpoint; our ZeRO-3 continues DeepSpeed's
    spawn(train_jobs, 2, [(_config(tiny_corpus, root / "ds3-resume", "deepspeed-zero3"),
                       str(load_checkpoint(root / "ds3-resume").path)),
                      (_config(tiny_corpus, root / "cross", "zero3"), str(load_checkpoint(root / "cross").path))],
          timeout_s=TIMEOUT)
    return root


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_equals_one_process(runs, stage):
    _same(runs / "single", runs / f"ds{stage}")


@needs_deepspeed
def test_deepspeed_resumes_exactly_and_under_our_engine(runs):
    _same(runs / "single", runs / "ds3-resume")  # 10 steps + resume + 10 == 20
    _same(runs / "single", runs / "cross")  # DeepSpeed ZeRO-2 for 10, ours ZeRO-3 for 10


@needs_deepspeed
def test_deepspeed_checkpoint_loads_in_one_process(runs, tiny_corpus, tmp_path):
    """The sharded checkpoint DeepSpeed wrote resumes in one process (the path `ltk generate`
    and `ltk export` read): same weights as the single-process run at that step."""
    ckpt = load_checkpoint(runs / "ds1")
    assert ckpt.state["step"] == STEPS
    single = load_checkpoint(runs / "single").model
    for k, v in ckpt.model.items():
        assert ((v - single[k]).norm() / single[k].norm()).item() <= 1e-5, k


def _deepspeed_installed(monkeypatch, installed: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "deepspeed" else real(name, *a))


def test_missing_deepspeed_is_refused_with_the_install_command(tiny_corpus, tmp_path, monkeypatch):
    _deepspeed_installed(monkeypatch, False)
    with pytest.raises(ConfigError, match=r"pip install deepspeed.*--parallel.strategy zero3"):
        check_run(_config(tiny_corpus, tmp_path / "x", "deepspeed-zero3"), world=2, size=False, warn=False)


def test_refused_combinations(tiny_corpus, tmp_path, monkeypatch):
    _deepspeed_installed(monkeypatch, True)  # the refusals hold whether or not it is installed here
    cfg = _config(tiny_corpus, tmp_path / "x", "deepspeed-zero2")
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match="drop --parallel.tp"):
        check_run(cfg, world=4, size=False, warn=False)
    cfg = _config(tiny_corpus, tmp_path / "x", "deepspeed-zero2")
    cfg.trainer.dtype = "fp16"
    with pytest.raises(ConfigError, match="bf16"):
        check_run(cfg, world=2, size=False, warn=False)
    cfg = _config(tiny_corpus, tmp_path / "x", "deepspeed-zero3")
    with pytest.raises(ConfigError, match="several processes"):
        check_run(cfg, world=1, size=False, warn=False)
