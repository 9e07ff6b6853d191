"""Bad run configs are refused before anything is allocated: one line naming the flag and its
range (exit code 2 from the CLI), a warning where the run still means something, and a size
check that refuses a crafted config (n_layer 1e9) before its model is built."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltk.cli import main
from ltk.training.config import ConfigError
from ltk.training.config_check import check_run
from ltk.training.presets import get_preset

# A data path that does not exist: were a check to run after data preparation (or not at all),
# the run would stop on the data instead, and the message asserted below would be missing.
TRIPWIRE = ["--data", "/no/such/corpus", "--max-steps", "1", "--trainer.progress", "false"]


@pytest.mark.parametrize("argv, words", [
    (["--device", "bogus"], ["--trainer.device 'bogus'", "cpu, cuda or cuda:N"]),
    (["--device", "cpuu"], ["did you mean cpu"]),
    (["--trainer.dtype", "fp8"], ["--trainer.dtype 'fp8'", "fp32, bf16, fp16"]),
    (["--trainer.log_every", "0"], ["--trainer.log_every must be >= 1, got 0"]),
    (["--trainer.batch_size", "0"], ["--trainer.batch_size must be >= 1, got 0"]),
    (["--trainer.grad_accum", "-1"], ["--trainer.grad_accum must be >= 1"]),
    (["--max-steps", "0", "--data", "/no/such/corpus"], ["--trainer.max_steps must be >= 1, got 0"]),
    (["--trainer.eval_every", "-1"], ["--trainer.eval_every must be >= 0"]),
    (["--trainer.ckpt_every", "-5"], ["--trainer.ckpt_every must be >= 0"]),
    (["--trainer.keep_last", "-1"], ["--trainer.keep_last must be >= 0"]),
    (["--trainer.eval_batches", "0"], ["--trainer.eval_batches must be >= 1"]),
    (["--trainer.seq_len", "1000"], ["--trainer.seq_len 1000 is larger than the model's positions"]),
    (["--optim.lr", "inf"], ["--optim.lr must be a finite number in (0, inf), got inf"]),
    (["--optim.lr", "nan"], ["--optim.lr", "got nan"]),
    (["--optim.lr", "-1e-3"], ["--optim.lr", "got -0.001"]),
    (["--optim.warmup_steps", "-1"], ["--optim.warmup_steps must be >= 0"]),
    (["--optim.beta2", "1"], ["--optim.beta2 must be a finite number in [0, 1)"]),
    (["--optim.grad_clip", "-1"], ["--optim.grad_clip"]),
    (["--optim.min_lr_ratio", "2"], ["--optim.min_lr_ratio must be a finite number in [0, 1]"]),
    (["--data.vocab_size", "100"], ["--data.vocab_size must be >= 257"]),
    (["--data.val_fraction", "1"], ["--data.val_fraction"]),
    (["--parallel.strategy", "bogus"], ["--parallel.strategy 'bogus' is not one of", "zero3"]),
    (["--parallel.strategy", "zer3"], ["did you mean zero3?"]),
    (["--parallel.schedule", "1f1"], ["--parallel.schedule", "did you mean 1f1b?"]),
    (["--parallel", "zero3"], ["--parallel.strategy zero3 needs several processes", "--nproc"]),
    (["--parallel", "ddp"], ["needs several processes", "--nproc"]),
    (["--parallel.tp", "2"], ["--parallel.tp 2 needs several processes", "--nproc"]),
    (["--parallel", "tp"], ["--parallel tp", "--nproc"]),
    (["--parallel", "zer3"], ["--parallel 'zer3'", "did you mean zero3?"]),
    (["--parallel.pp", "2", "--parallel.tp", "2"], ["pipeline parallelism (--parallel.pp) runs GPT"]),
    (["--parallel.pp", "2", "--parallel.schedule", "interleaved", "--trainer.grad_accum", "3"],
     ["--trainer.grad_accum 3 must be a multiple of --parallel.pp 2"]),
    (["--parallel.tp", "2", "--model.dropout", "0.1"], ["--model.dropout 0"]),
    (["--parallel.tp", "2", "--parallel.strategy", "torch-ddp"], ["torch-ddp does not combine with --parallel.tp"]),
    (["--trainer.dtype", "fp16", "--parallel.strategy", "zero1"], ["--trainer.dtype fp16 needs a loss scaler"]),
    (["--parallel.reduce_dtype", "fp8"], ["--parallel.reduce_dtype 'fp8' is not one of", "fp32"]),
    (["--parallel.reduce_dtype", "bf16", "--trainer.dtype", "fp32"], ["it needs --trainer.dtype bf16"]),
    (["--parallel.reduce_dtype", "fp32", "--trainer.dtype", "fp16"], ["fp16 runs keep fp32 gradients"]),
    (["--parallel.reduce_dtype", "fp32", "--trainer.dtype", "bf16", "--parallel.strategy", "torch-ddp"],
     ["PyTorch's DDP (torch-ddp) reduces gradients in their own dtype"]),
    (["--parallel.tp", "2", "--trainer.compile", "true"], ["--trainer.compile with tensor parallelism"]),
    (["--parallel.pp", "2", "--trainer.compile", "true"], ["without --trainer.compile"]),
    (["--model.n_layer", "0"], ["model.n_layer must be positive"]),
    (["--model.n_head", "5"], ["not divisible by model.n_head=5"]),
    (["--family", "lama"], ["did you mean llama?"]),
])
def test_bad_values_are_refused_naming_the_flag(argv, words, capsys):
    assert main(["train", *TRIPWIRE, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ltk train: error: ") and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_the_layout_is_checked_before_processes_start(capsys):
    """With --nproc the parent checks the layout and refuses before torchrun starts anything."""
    for argv, needle in [
        (["--parallel.tp", "3"], "--parallel.tp 3 x --parallel.pp 1 = 3 does not divide the 2 processes"),
        (["--parallel", "ddp", "--trainer.batch_size", "3"], "does not split over 2 data-parallel ranks"),
        (["--trainer.dtype", "bf16", "--parallel.reduce_dtype", "fp32"], "--parallel.strategy auto runs PyTorch's DDP"),
    ]:
        assert main(["train", *TRIPWIRE, "--nproc", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "launching" not in err


def test_the_trainer_checks_before_it_reads_data(tiny_config, tmp_path):
    from ltk.training.trainer import Trainer

    cfg = tiny_config(log_every=0)
    cfg.data.source = str(tmp_path / "no-such-corpus")
    with pytest.raises(ConfigError, match="--trainer.log_every must be >= 1"):
        Trainer(cfg)


def test_a_run_shorter_than_its_warmup_warns(capsys):
    cfg = get_preset("gpt-debug")  # warmup_steps 50
    assert check_run(cfg, size=False) == []
    cfg.trainer.max_steps = 20
    found = check_run(cfg, size=False)
    assert len(found) == 1 and "never reaches its peak" in found[0] and "--optim.warmup_steps" in found[0]
    assert "warning: trainer.max_steps 20 is shorter than optim.warmup_steps 50" in capsys.readouterr().err
    check_run(cfg, size=False, warn=False)
    assert capsys.readouterr().err == ""


def test_a_valid_layout_passes():
    cfg = get_preset("gpt-debug")
    cfg.parallel.strategy, cfg.parallel.tp = "zero1", 2
    check_run(cfg, world=4, size=False, warn=False)
    for strategy, tp, pp in (("zero3", 2, 1), ("ddp", 1, 2)):  # once refused or silently degraded
        cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.pp = strategy, tp, pp
        cfg.trainer.dtype, cfg.parallel.reduce_dtype, cfg.trainer.activation_checkpointing = "bf16", "fp32", True
        check_run(cfg, world=4, size=False, warn=False)
    cfg.parallel.tp, cfg.parallel.pp, cfg.trainer.compile = 1, 1, True
    check_run(cfg, world=4, size=False, warn=False)
    cfg.parallel.strategy = "zero1"
    cfg.parallel.strategy = "zero4"
    with pytest.raises(ConfigError, match="did you mean zero"):
        check_run(cfg, world=4, size=False, warn=False)


# -- size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("n_layer", 10**9), ("vocab_size", 10**12), ("n_embd", 2**40)])
def test_a_model_too_large_for_memory_is_refused(field, value):
    cfg = get_preset("gpt-debug")
    setattr(cfg.model, field, value)
    with pytest.raises(ValueError) as e:
        check_run(cfg, warn=False)
    msg = str(e.value)
    assert "too large" in msg and "16 bytes per parameter" in msg and "free" in msg
    assert f"lower model.{field} ({value:,})" in msg  # only the field that alone brings it back


def test_the_size_is_per_rank_under_sharding():
    """ZeRO-3 over 4 ranks holds a quarter of each state, but every rank builds the whole fp32
    model first (4 bytes per parameter), and ranks on one host share its memory."""
    from ltk.models.sizing import available_bytes, parameter_count

    cfg = get_preset("gpt-debug")
    cfg.trainer.device, cfg.model.vocab_size = "cpu", 2048
    per_layer = parameter_count(dataclasses.replace(cfg.model, n_layer=2)) - parameter_count(
        dataclasses.replace(cfg.model, n_layer=1))
    cfg.model.n_layer = int(available_bytes() / 8 / per_layer)  # ~free/8 parameters: 4 bytes each fit, 16 do not
    with pytest.raises(ValueError, match="16 bytes per parameter"):
        check_run(cfg, world=1, warn=False)
    cfg.parallel.strategy = "zero3"
    check_run(cfg, world=4, local=1, warn=False)  # one rank per host: its 4 bytes per parameter fit
    with pytest.raises(ValueError, match="x 4 processes"):
        check_run(cfg, world=4, warn=False)  # all 4 ranks on this host


def _limited(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose address space is capped at 3 GiB: a check that
    lets the model be built fails with MemoryError here instead of exhausting the machine."""
    prologue = ("import resource, sys\n"
                "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n")
    return subprocess.run([sys.executable, "-c", prologue + code], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_a_crafted_run_config_json_fails_fast_without_allocating(tmp_path, capsys):
    assert main(["train", "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    d["model"]["n_layer"] = 1e9  # what a hand-edited config.json says
    (tmp_path / "config.json").write_text(json.dumps(d))
    out = _limited("from ltk.cli import main\n"
                   "sys.exit(main(['train', '--config', 'config.json', '--data', '/no/such/corpus']))", tmp_path)
    assert out.returncode == 2, out.stderr
    assert "too large" in out.stderr and "lower model.n_layer (1,000,000,000)" in out.stderr
    assert "Traceback" not in out.stderr and "MemoryError" not in out.stderr


def test_generate_refuses_a_crafted_checkpoint_config(tmp_path):
    """A checkpoint whose state.json (manifest and all) claims 1e9 layers: `ltk generate` names
    the file and the field before it builds the model."""
    from ltk.training.checkpoint import save_checkpoint

    cfg = get_preset("gpt-debug")
    cfg.model.vocab_size, cfg.model.n_layer = 300, 10**9
    save_checkpoint(tmp_path / "run", 1, {"wte.weight": torch.zeros(3, 4)}, {"rng": {}}, {"config": cfg.to_dict()})
    out = _limited("from ltk.cli import main\n"
                   "sys.exit(main(['generate', '--ckpt', 'run', '--prompt', 'x', '--device', 'cpu']))", tmp_path)
    assert out.returncode == 2, out.stderr
    assert "state.json" in out.stderr and "lower model.n_layer (1,000,000,000)" in out.stderr
    assert "MemoryError" not in out.stderr


def _gpt2_config(**fields) -> dict:
    base = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 300, "n_positions": 64,
            "n_embd": 32, "n_layer": 1, "n_head": 2}
    return {**base, **fields}


def test_a_crafted_hugging_face_config_fails_fast_without_allocating(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(_gpt2_config(n_layer=1e9)))
    code = "from ltk.models import from_pretrained\ntry:\n    from_pretrained('hf')\n"
    out = _limited(code + "except ValueError as e:\n    print(e)\n    sys.exit(2)\n", tmp_path)
    assert out.returncode == 2, out.stderr
    assert "config.json" in out.stdout and "too large" in out.stdout and "model.n_layer (1e+09)" in out.stdout


@pytest.mark.parametrize("fields, words", [
    (dict(vocab_size=10**12), ["too large", "model.vocab_size"]),
    (dict(n_layer=-1), ["model.n_layer must be positive"]),
    (dict(n_head=3), ["not divisible by model.n_head=3"]),
    (dict(n_embd=None), ["n_embd"]),
])
def test_hugging_face_config_errors_name_the_file_and_field(tmp_path, fields, words):
    from ltk.models import from_pretrained

    d = _gpt2_config(**fields)
    if fields.get("n_embd", 0) is None:
        del d["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_generate_names_a_crafted_hugging_face_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(_gpt2_config(vocab_size=10**12)))
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "lower model.vocab_size" in err


def test_on_cuda_the_host_holds_the_built_model_and_the_device_the_state(monkeypatch):
    """No GPU needed: the CUDA branch's two checks are recorded instead of run."""
    import ltk.training.config_check as cc
    import ltk.training.runtime as runtime

    calls = []

    def record(model, per_param, device, **kw):
        calls.append((per_param, str(device), kw.get("copies", 1)))

    monkeypatch.setattr(cc, "check_fits", record)
    monkeypatch.setattr(runtime, "resolve_device", lambda name, local_rank=0: torch.device("cuda", local_rank))
    cfg = get_preset("gpt-debug")
    cfg.parallel.strategy = "zero2"  # shards gradients and moments over dp = 2 (tp 2)
    cfg.parallel.tp = 2
    check_run(cfg, world=4, local=4, warn=False)
    # host: the whole fp32 model, once per local rank; device: weights / tp + (grads + moments) / (tp x dp)
    assert calls == [(4, "cpu", 4), (4 / 2 + 12 / 4, "cuda:0", 1)]


def test_compile_with_a_data_parallel_engine_compiles_each_block_in_place():
    """--trainer.compile under ddp/zero: every block compiled in place (the engines' hooks and
    the parameter names unchanged), not silently dropped. Compilation itself waits for a call."""
    from ltk.models.gpt import GPT
    from ltk.training.engine import compile_blocks

    cfg = get_preset("gpt-debug")
    cfg.model.vocab_size = 300
    model = GPT(cfg.model)
    names = [n for n, _ in model.named_parameters()]
    assert compile_blocks(model) == cfg.model.n_layer
    assert all(b._compiled_call_impl is not None for b in model.h)
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError, match="has none"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("changes, words", [
    (dict(sequence_parallel=True), "needs --parallel.tp > 1"),
    (dict(strategy="zero3", reshard_after_forward=False), "FSDP2's setting"),
    (dict(strategy="zero3", bucket_mb=4.0), "does not read it"),
    (dict(strategy="ddp", pp=2, bucket_mb=4.0), "with --parallel.pp"),
])
def test_a_parallel_setting_the_engine_would_ignore_is_refused(changes, words):
    cfg = get_preset("gpt-debug")
    for k, v in changes.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError, match=words.replace("+", r"\+").replace(".", r"\.")):
        check_run(cfg, world=4, size=False, warn=False)
    for k, v in (("strategy", "zero2"), ("bucket_mb", 4.0)), (("strategy", "fsdp2"), ("reshard_after_forward", False)):
        ok = get_preset("gpt-debug")
        for name, value in (k, v):
            setattr(ok.parallel, name, value)
        check_run(ok, world=4, size=False, warn=False)  # the engines that read them take them
