"""Pipeline x FSDP2 (`--parallel fsdp2 --parallel.pp 2 --parallel.pp_engine torch`,
ltk/parallel/torch_pp_fsdp.py): torch.distributed.pipelining's 1F1B over two stages, each
fully_shard-ed over dp 2 (4 gloo processes), trains the same model as one process (losses within
1e-5 for 20 steps, same validation loss and weights); it resumes exactly (10 + resume + 10 == 20,
bit for bit); its checkpoint resumes on one process and a one-process checkpoint resumes under it;
`ltk generate`'s path reads it.

All 4-process runs share one group (importing torch in every rank costs seconds): about 40 s on
two cores."""
import pytest
import torch
from engine_runs import metrics, resumed_exactly, same_run, same_weights, train_jobs

from ltk.models.gpt import GPT, GPTConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint, restore_model
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.config_check import ConfigError, check_run
from ltk.training.trainer import Trainer

TIMEOUT = 300
STEPS, HALF = 20, 10


def _config(corpus, out, fsdp=True, steps=STEPS):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=4, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=40),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=HALF, eval_batches=4, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=2, ckpt_every=HALF))
    cfg.model.backend = "torch"
    if fsdp:
        p = cfg.parallel
        p.strategy, p.pp, p.pp_engine, p.schedule = "fsdp2", 2, "torch", "1f1b"
    return cfg


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """'single' (one process, 20 steps); on 4 ranks: 'pp-fsdp' (20 steps, checkpoints at 10 and 20),
    'pp-fsdp-resume' (10 more from pp-fsdp's step 10), 'one-to-pp-fsdp' (10 from single's step 10);
    'pp-fsdp-to-one' (10 more from pp-fsdp's step 10 on one process, in this process)."""
    root = tmp_path_factory.mktemp("pp-fsdp")
    run = {n: root / n for n in ("single", "pp-fsdp", "pp-fsdp-resume", "one-to-pp-fsdp", "pp-fsdp-to-one")}
    half = lambda name: run[name] / "checkpoints" / f"step_{HALF:06d}"  # noqa: E731
    Trainer(_config(tiny_corpus, run["single"], fsdp=False)).fit()
    spawn(train_jobs, 4, [(_config(tiny_corpus, run["pp-fsdp"]), None),
                          (_config(tiny_corpus, run["pp-fsdp-resume"]), half("pp-fsdp")),
                          (_config(tiny_corpus, run["one-to-pp-fsdp"]), half("single"))], timeout_s=TIMEOUT)
    Trainer(_config(tiny_corpus, run["pp-fsdp-to-one"], fsdp=False), resume=load_checkpoint(half("pp-fsdp"))).fit()
    return run


def _same_tail(single, run):
    """A run resumed in a new folder logs steps HALF+1.. only: those losses, and the final weights."""
    ref = {m["step"]: m for m in metrics(single)}
    got = metrics(run)
    assert [m["step"] for m in got] == list(range(HALF + 1, STEPS + 1))
    for m in got:
        assert m["loss"] == pytest.approx(ref[m["step"]]["loss"], rel=1e-5, abs=1e-5), m["step"]
    same_weights(load_checkpoint(single).model, load_checkpoint(run).model)


def test_pp_x_fsdp2_equals_one_process(runs):
    same_run(runs["single"], runs["pp-fsdp"], STEPS, grad_norm_tol=1e-5)  # the norm: tied weight once, shards summed


def test_pp_x_fsdp2_resume_is_exact(runs):
    """10 steps + resume + 10 steps == 20 uninterrupted steps of the same layout, bit for bit."""
    resumed_exactly(runs["pp-fsdp"], runs["pp-fsdp-resume"], HALF, STEPS)


@pytest.mark.parametrize("name", ["pp-fsdp-to-one", "one-to-pp-fsdp"])
def test_pp_x_fsdp2_checkpoints_cross_to_and_from_one_process(runs, name):
    _same_tail(runs["single"], runs[name])


def test_pp_x_fsdp2_checkpoint_loads_for_generation(runs):
    """`ltk generate`'s path: the sharded checkpoint restored into a model built from its config is
    the one-process model (the tied weight once), and it samples."""
    from ltk.training.config_file import config_from_dict

    ckpt = load_checkpoint(runs["pp-fsdp"])
    model = GPT(config_from_dict(ckpt.state["config"], ckpt.path / "state.json").model).eval()
    restore_model(model, ckpt.model)
    single = load_checkpoint(runs["single"]).model
    same_weights(single, {k: v for k, v in model.state_dict().items() if k in single})
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, model.config.vocab_size)


@pytest.mark.parametrize("change, words", [
    (dict(pp_engine="ltk"), ["--parallel.pp_engine torch", "--parallel ddp --parallel.pp N"]),
    (dict(tp=2), ["3-D", "fsdp2 --parallel.tp N", "fsdp2 --parallel.pp N --parallel.pp_engine torch"]),
    (dict(strategy="torch-tp"), ["torch-tp with --parallel.pp", "--parallel fsdp2 --parallel.pp N"]),
])
def test_what_does_not_compose_is_refused(tiny_corpus, tmp_path, change, words):
    cfg = _config(tiny_corpus, tmp_path / "x")
    for k, v in change.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError) as e:
        check_run(cfg, world=8, size=False, warn=False)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_pp_x_fsdp2_passes_the_checks(tiny_corpus, tmp_path):
    cfg = _config(tiny_corpus, tmp_path / "x")
    check_run(cfg, world=4, size=False, warn=False)
    cfg.trainer.dtype, cfg.parallel.reshard_after_forward = "bf16", False
    check_run(cfg, world=4, size=False, warn=False)
