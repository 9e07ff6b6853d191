"""PyTorch's engines behind `--parallel` (ltk/parallel/fsdp2.py, torch_tp.py): `Trainer` with
fsdp2 and torch-tp on 2 gloo processes trains the same model as one process — per-step losses
within 1e-5 for 20 steps (fp32), the same validation loss and final weights — and their sharded
checkpoints resume exactly, across engines and on one process, and load into `ltk generate`'s path.

As tests/distributed/test_parallel_trainer.py: every run is planned up front and each world size
starts once (importing torch in every rank costs seconds, a 20-step run of this model a fraction
of that); the tests only read the run folders. The model has no biases (see that file: GPT's key
bias has an exactly zero gradient, which Adam turns into ±lr noise under any change of reduction
order). FSDP2 x DTensor TP on 4 ranks is its own group, deselected by default (-m exhaustive)."""
import pytest
import torch
from engine_runs import metrics, resumed_exactly, same_weights, train_jobs

from ltk.models.gpt import GPT, GPTConfig
from ltk.models.llama import LlamaConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint, restore_model
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
from ltk.training.trainer import Trainer

TIMEOUT = 300
STEPS, HALF = 20, 10
LLAMA_STEPS = 6  # Llama under torch-tp: its own head split (local head counts), a shorter run


def _config(corpus, out, strategy="auto", tp=1, steps=STEPS, family="gpt", sp=False):
    cfg = RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=STEPS),
        trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=STEPS, eval_batches=4, log_every=1,
                              out_dir=str(out), progress=False, seed=7, grad_accum=2, ckpt_every=HALF))
    if family == "llama":  # GQA: 4 query heads over 2 key/value heads, split 2 and 1 per rank
        cfg.family, cfg.model = "llama", LlamaConfig(vocab_size=0, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                                     n_embd=32, intermediate_size=64, rope_theta=10000.0)
    cfg.model.backend = "torch"
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.sequence_parallel = strategy, tp, sp
    return cfg


def _max_loss_gap(single, run, steps=STEPS) -> float:
    a, b = metrics(single), metrics(run)
    assert [m["step"] for m in a] == [m["step"] for m in b] and len(a) == steps
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5, abs=1e-5)
    return max(abs(ma["loss"] - mb["loss"]) for ma, mb in zip(a, b))


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """'single' (one process), 'fsdp2' and 'torch-tp' (2 ranks, 20 steps, checkpoints at 10 and 20);
    'single-llama' and 'torch-tp-llama' (6 steps);
    from fsdp2's step-10 checkpoint, in new folders: 'fsdp2-resume' (10 more of fsdp2) and
    'fsdp2-to-one' (10 more on one process, in this process); 'zero3-to-fsdp2' (10 steps of our
    ZeRO-3, then 10 of fsdp2)."""
    root = tmp_path_factory.mktemp("engines")
    run = {name: root / name for name in ("single", "fsdp2", "torch-tp", "fsdp2-resume", "zero3-to-fsdp2",
                                          "fsdp2-to-one", "single-llama", "torch-tp-llama", "torch-tp-sp",
                                          "torch-tp-llama-sp")}
    half = run["fsdp2"] / "checkpoints" / f"step_{HALF:06d}"
    llama = dict(steps=LLAMA_STEPS, family="llama")
    spawn(train_jobs, 1, [(_config(tiny_corpus, run["single"]), None),
                      (_config(tiny_corpus, run["single-llama"], **llama), None)], timeout_s=TIMEOUT)
    jobs = [(_config(tiny_corpus, run["fsdp2"], "fsdp2"), None),
            (_config(tiny_corpus, run["torch-tp"], "torch-tp", tp=2), None),
            (_config(tiny_corpus, run["torch-tp-llama"], "torch-tp", tp=2, **llama), None),
            (_config(tiny_corpus, run["torch-tp-sp"], "torch-tp", tp=2, sp=True), None),
            (_config(tiny_corpus, run["torch-tp-llama-sp"], "torch-tp", tp=2, sp=True, **llama), None),
            (_config(tiny_corpus, run["fsdp2-resume"], "fsdp2"), half),
            (_config(tiny_corpus, run["zero3-to-fsdp2"], "zero3", steps=HALF), None),
            (_config(tiny_corpus, run["zero3-to-fsdp2"], "fsdp2"), run["zero3-to-fsdp2"])]
    spawn(train_jobs, 2, jobs, timeout_s=TIMEOUT)
    Trainer(_config(tiny_corpus, run["fsdp2-to-one"]), resume=load_checkpoint(half)).fit()
    return run


def test_fsdp2_and_torch_tp_equal_one_process(runs):
    gaps = {e: _max_loss_gap(runs["single"], runs[e]) for e in ("fsdp2", "torch-tp")}
    assert all(g <= 1e-5 for g in gaps.values()), gaps
    for e in gaps:
        same_weights(load_checkpoint(runs["single"]).model, load_checkpoint(runs[e]).model)
    assert _max_loss_gap(runs["single-llama"], runs["torch-tp-llama"], LLAMA_STEPS) <= 1e-5
    same_weights(load_checkpoint(runs["single-llama"]).model, load_checkpoint(runs["torch-tp-llama"]).model)


def test_torch_tp_with_sequence_parallelism_equals_one_process(runs):
    """Norms and residual adds on T/n positions per rank, a reduce-scatter and an all-gather around
    each sub-layer, the norms' gradients summed over the group: the same run as one process."""
    assert _max_loss_gap(runs["single"], runs["torch-tp-sp"]) <= 1e-5
    same_weights(load_checkpoint(runs["single"]).model, load_checkpoint(runs["torch-tp-sp"]).model)
    assert _max_loss_gap(runs["single-llama"], runs["torch-tp-llama-sp"], LLAMA_STEPS) <= 1e-5
    same_weights(load_checkpoint(runs["single-llama"]).model, load_checkpoint(runs["torch-tp-llama-sp"]).model)


def test_fsdp2_resume_is_exact(runs):
    """10 steps + resume + 10 steps == 20 uninterrupted steps of the same engine, bit for bit."""
    resumed_exactly(runs["fsdp2"], runs["fsdp2-resume"], HALF, STEPS)


@pytest.mark.parametrize("name", ["zero3-to-fsdp2", "fsdp2-to-one"])
def test_checkpoints_cross_engines(runs, name):
    """Our ZeRO-3's checkpoint resumes under fsdp2; fsdp2's resumes on one process; either way the
    20 steps equal one process's."""
    by_step = {m["step"]: m for m in metrics(runs[name])}
    assert max(by_step) == STEPS
    for m in metrics(runs["single"]):
        if m["step"] not in by_step:  # a run resumed in a new folder logs its own steps only
            assert m["step"] <= HALF
            continue
        assert by_step[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-5)
    same_weights(load_checkpoint(runs["single"]).model, load_checkpoint(runs[name]).model)


def test_fsdp2_checkpoint_loads_for_generation(runs):
    """`ltk generate`'s path: the sharded checkpoint's tensors restored into a model built from its
    config equal the one-process weights, and it samples."""
    from ltk.training.config_file import config_from_dict

    ckpt = load_checkpoint(runs["fsdp2"])
    model = GPT(config_from_dict(ckpt.state["config"], ckpt.path / "state.json").model).eval()
    restore_model(model, ckpt.model)
    single = load_checkpoint(runs["single"]).model
    same_weights(single, {k: v for k, v in model.state_dict().items() if k in single})
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, model.config.vocab_size)


def test_torch_tp_checkpoint_exports_to_hugging_face(runs, tmp_path):
    """`ltk export --hf` from a torch-tp checkpoint (Llama: GPT-2's export needs biases, this
    model has none) writes the one-process tensors."""
    from safetensors.torch import load_file

    from ltk.training.export_hf import export_hf

    hf = load_file(export_hf(runs["torch-tp-llama"], tmp_path / "hf") / "model.safetensors")
    single = load_checkpoint(runs["single-llama"]).model
    same_weights({"e": single["tok_embeddings.weight"], "g": single["layers.1.mlp.w1.weight"]},
                  {"e": hf["model.embed_tokens.weight"], "g": hf["model.layers.1.mlp.gate_proj.weight"]})


@pytest.mark.exhaustive
def test_fsdp2_x_tensor_parallel_equals_one_process(runs, tiny_corpus, tmp_path):
    """FSDP2 over dp 2 x DTensor TP 2 on a 2-D mesh (4 ranks), torchtitan's order. Four processes
    on two cores cost about 45 s, so it is deselected by default: `pytest -m exhaustive -k fsdp2_x`."""
    spawn(train_jobs, 4, [(_config(tiny_corpus, tmp_path / "fsdp2-tp2", "fsdp2", tp=2), None)], timeout_s=TIMEOUT)
    assert _max_loss_gap(runs["single"], tmp_path / "fsdp2-tp2") <= 1e-5
    same_weights(load_checkpoint(runs["single"]).model, load_checkpoint(tmp_path / "fsdp2-tp2").model)


def test_fsdp2_x_tensor_x_sequence_parallel_equals_one_process(runs, tiny_corpus, tmp_path):
    """torchtitan's 2-D layout with sequence parallelism: FSDP2 over dp 2, DTensor TP 2 with the
    norms and position table on T/2 positions (4 ranks). FSDP2 computes with its own unsharded
    copies of the norms, so their tp sums must live in the graph (torch_tp.sum_plain_grads_over_tp):
    a hook on the parameter would not fire and the norms would train on half the positions."""
    spawn(train_jobs, 4, [(_config(tiny_corpus, tmp_path / "fsdp2-tp2-sp", "fsdp2", tp=2, sp=True), None)],
          timeout_s=TIMEOUT)
    assert _max_loss_gap(runs["single"], tmp_path / "fsdp2-tp2-sp") <= 1e-5
    same_weights(load_checkpoint(runs["single"]).model, load_checkpoint(tmp_path / "fsdp2-tp2-sp").model)


# -- refusals, before any process starts (no group: cheap) -----------------------------------------
@pytest.mark.parametrize("change, world, words", [
    (dict(strategy="torch-tp", tp=2), 4, ["leaves 2 data-parallel ranks", "--parallel fsdp2 --parallel.tp 2"]),
    (dict(strategy="torch-tp"), 2, ["tp is 1", "--parallel torch-tp --nproc N"]),
    (dict(strategy="fsdp2"), 1, ["needs several processes", "--nproc N"]),
    (dict(strategy="fsdp2", pp=2), 4, ["--parallel fsdp2 with --parallel.pp", "add --parallel.pp_engine torch",
                                       "--parallel ddp --parallel.pp N"]),
    (dict(strategy="fsdp2", sequence_parallel=True), 2, ["needs --parallel.tp > 1"]),
    (dict(strategy="torch-tp", tp=2, dtype="bf16"), 2, ["trains in fp32", "--parallel fsdp2 --parallel.tp N"]),
    (dict(strategy="fsdp2", compile=True), 2, ["--trainer.compile", "--parallel zero3"]),
    (dict(strategy="torch-tp", tp=2, family="bert"), 2, ["plans for gpt and llama", "fsdp2 alone"]),
])
def test_unsupported_combinations_are_refused_with_the_nearest_choice(change, world, words):
    from ltk.training.config import ConfigError
    from ltk.training.config_check import check_run
    from ltk.training.presets import get_preset

    cfg = get_preset("bert-debug" if change.pop("family", None) == "bert" else "gpt-debug")
    cfg.trainer.dtype = change.pop("dtype", "fp32")
    cfg.trainer.compile = change.pop("compile", False)
    for k, v in change.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError) as e:
        check_run(cfg, world=world, size=False, warn=False)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_supported_layouts_pass_the_checks():
    from ltk.training.config_check import check_run
    from ltk.training.presets import get_preset

    for strategy, tp, world, dtype, sp in (("fsdp2", 1, 2, "bf16", False), ("fsdp2", 2, 4, "bf16", False),
                                          ("torch-tp", 2, 2, "fp32", False), ("torch-tp", 2, 2, "fp32", True),
                                          ("fsdp2", 2, 4, "bf16", True)):
        cfg = get_preset("gpt-debug")
        cfg.parallel.strategy, cfg.parallel.tp, cfg.trainer.dtype = strategy, tp, dtype
        cfg.parallel.sequence_parallel = sp
        check_run(cfg, world=world, size=False, warn=False)
