"""Bad input to `ltk finetune`, `plan`, `generate`, to the output folders of every command that
writes, and to a multi-process run: each is one line `ltk CMD: error: ...` naming the flag or
the path (exit code 2), before any work is done, never a traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ltk.cli import main
from ltk.models.generate import filter_logits, generate
from ltk.training.launch import error_lines, report_error

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _refused(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    return err


# -- ltk finetune ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, needle", [
    ("--steps", "0", "--steps 0: must be >= 1"),
    ("--batch-size", "0", "--batch-size 0: must be >= 1"),
    ("--max-len", "1", "--max-len 1: must be >= 2"),
    ("--eval-every", "-1", "--eval-every -1: must be >= 0"),
    ("--lora-r", "0", "--lora-r 0: must be >= 1"),
    ("--lora-alpha", "0", "--lora-alpha 0.0: must be a finite number > 0"),
    ("--lora-alpha", "nan", "--lora-alpha nan"),
    ("--lora-dropout", "1", "--lora-dropout 1.0: must be in [0, 1)"),
    ("--lora-dropout", "-0.1", "--lora-dropout -0.1"),
    ("--lr", "-0.001", "--lr -0.001: must be a finite number >= 0"),
    ("--lr", "inf", "--lr inf"),
    ("--limit", "1", "--limit 1: must be >= 2"),
])
def test_finetune_refuses_each_numeric_flag_out_of_range(flag, value, needle, tmp_path, capsys):
    out = tmp_path / "ft"
    _refused(["finetune", "--base", str(tmp_path / "base"), "--out", str(out), flag, value], needle, capsys)
    assert not out.exists()  # refused before anything was written (or the base was read)


def test_finetune_eval_every_0_evaluates_only_after_the_last_step(tiny_base, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--base", str(tiny_base), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--max-len", "96", "--limit", "24", "--eval-every", "0", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert ["val_loss" in r for r in rows] == [False, False, True]


# -- ltk plan -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--world", "0"], "--world 0: must be >= 1"),
    (["--world", "-4"], "--world -4: must be >= 1"),
    (["--world", "4", "--tp", "0"], "--tp 0: must be >= 1"),
    (["--world", "4", "--pp", "-2"], "--pp -2: must be >= 1"),
    (["--world", "4", "--tp", "3"], "--world 4 is not divisible by --tp x --pp = 3"),
    (["--world", "4", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--world", "4", "--micro-batches", "0"], "--micro-batches 0: must be >= 1"),
    (["--world", "4", "--seq-len", "0"], "--seq-len 0: must be >= 1"),
    (["--world", "4", "--virtual-stages", "0"], "--virtual-stages 0: must be >= 1"),
    (["--world", "4", "--cluster", "dgx-a100", "--efficiency", "0"], "--efficiency 0.0: must be in (0, 1]"),
    (["--world", "4", "--cluster", "dgx-a100", "--efficiency", "1.5"], "--efficiency 1.5"),
    (["--world", "4", "--pp", "2", "--micro-batches", "3"], "do not split into --micro-batches 3"),
])
def test_plan_refuses_impossible_meshes_and_batches(extra, needle, capsys):
    _refused(["plan", "--preset", "gpt2-124m", *extra], needle, capsys)


def test_plan_of_a_valid_mesh_has_positive_memory(capsys):
    assert main(["plan", "--preset", "gpt2-124m", "--world", "4", "--pp", "2", "--micro-batches", "2", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["activations"] > 0 and p["total"] > 0


# -- ltk generate ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be >= 0"),
    (["--top-k", "-5"], "--top-k -5: must be >= 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan"),
])
def test_generate_refuses_sampling_settings_before_loading(extra, needle, tmp_path, capsys):
    # the checkpoint does not exist: the settings are refused before it would be read
    _refused(["generate", "--ckpt", str(tmp_path / "none"), "--prompt", "x", *extra], needle, capsys)


def test_generate_caps_new_tokens_at_the_models_context(tiny_base, capsys):
    err = _refused(["generate", "--ckpt", str(tiny_base), "--prompt", "alpha", "--max-new-tokens", "1000000000"],
                   "--max-new-tokens 1000000000: at most 96", capsys)
    assert "block_size" in err
    # no --max-new-tokens: the default (100) is lowered to the 96 positions, not refused
    assert main(["generate", "--ckpt", str(tiny_base), "--prompt", "alpha", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("alpha")


def test_generate_from_an_empty_prompt_samples_a_new_document(tiny_base, capsys):
    assert main(["generate", "--ckpt", str(tiny_base), "--prompt", "", "--max-new-tokens", "8", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "the prompt is empty; sampling from the end-of-text token" in captured.err
    assert "Traceback" not in captured.err


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path):
    """Bytes that are not UTF-8 reach Python as lone surrogates; they are named, not a traceback."""
    proc = subprocess.run([sys.executable, "-m", "ltk.cli", "generate", "--ckpt", str(tmp_path), "--prompt", b"ab\xff"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "ltk generate: error: --prompt is not valid UTF-8 text (byte 0xff at character 2)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_generate_api_checks_its_arguments():
    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 7)

    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="--max-new-tokens -2"):
        generate(Uniform(), idx, -2, block_size=8)
    with pytest.raises(ValueError, match="--top-k -1"):
        generate(Uniform(), idx, 1, block_size=8, top_k=-1)
    logits = torch.randn(2, 7)
    assert torch.equal(filter_logits(logits, top_k=0), logits)  # 0: no top-k filter, as on the command line
    assert generate(Uniform(), idx, 4, block_size=8, top_k=0).shape == (1, 7)


# -- output folders that cannot be written --------------------------------------------------
@pytest.fixture
def blocked(tmp_path):
    """A path no one can create, root included: a regular file stands where its folder would be."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


@pytest.mark.parametrize("argv, flag", [
    (["train", "--max-steps", "1", "--out", "{}"], "--out"),
    (["finetune", "--base", "/no/base", "--out", "{}"], "--out"),
    (["lab", "run", "pretrain", "--quick", "--out", "{}"], "--out"),
    (["bench", "train-step", "--save-results", "{}"], "--save-results"),
    (["bench", "train-step", "--csv", "{}/rows.csv"], "--csv"),
])
def test_an_unwritable_output_is_named_before_any_work(argv, flag, blocked, capsys):
    argv = [a.format(blocked) for a in argv]
    err = _refused(argv, f"{flag} {blocked}", capsys)
    assert "a file is in the way" in err


def test_a_folder_without_write_permission_is_named(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        out = ro / "ft"
        _refused(["finetune", "--base", "/no/base", "--out", str(out)], f"--out {out}: cannot write", capsys)
    finally:
        ro.chmod(0o700)


def test_a_csv_path_that_is_a_folder_is_named(tmp_path, capsys):
    _refused(["bench", "train-step", "--csv", str(tmp_path)], f"--csv {tmp_path}: is a folder", capsys)


# -- multi-process runs ---------------------------------------------------------------------
def test_nproc_below_1_is_refused(capsys):
    _refused(["train", "--nproc", "0"], "--nproc 0: must be >= 1", capsys)


def test_a_rank_started_by_hand_names_itself(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LTK_RANK_ERRORS", raising=False)
    report_error("train", "bad value")
    assert capsys.readouterr().err == "ltk train [rank 1]: error: bad value\n"


def test_the_launcher_prints_each_distinct_rank_error_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LTK_RANK_ERRORS", str(tmp_path))
    for rank, message in ((0, "same"), (1, "same")):
        monkeypatch.setenv("RANK", str(rank))
        report_error("train", message)
    assert capsys.readouterr().err == ""  # written for the launcher, not printed
    assert error_lines(tmp_path, "train") == ["ltk train: error: same"]
    monkeypatch.setenv("RANK", "2")
    report_error("train", "other")
    assert error_lines(tmp_path, "train") == ["ltk train [ranks 0, 1]: error: same",
                                              "ltk train [rank 2]: error: other"]


def test_a_bad_setting_in_a_two_process_run_is_one_line(tiny_corpus, tmp_path):
    """The trainer refuses a global batch of 3 over 2 ranks (on every rank, after the data is
    prepared): the user sees that line once, and none of torchrun's failure report."""
    args = ["--data", str(tiny_corpus), "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--model.vocab_size", "0", "--model.block_size", "32", "--model.n_layer", "1", "--model.n_head", "2",
            "--model.n_embd", "32", "--data.vocab_size", "300", "--data.min_chars", "16",
            "--trainer.progress", "false", "--trainer.batch_size", "3"]
    proc = subprocess.run([sys.executable, "-m", "ltk.cli", "train", "--parallel", "ddp", "--nproc", "2", *args],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ltk train: error: "), proc.stderr[-3000:]
    assert "does not split over 2 data-parallel ranks" in lines[0]
    for wall in ("Traceback", "ChildFailedError", "exitcode"):
        assert wall not in proc.stderr, proc.stderr[-3000:]


def test_a_crashed_rank_keeps_its_traceback_and_gets_one_line(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('boom on rank 1')\n")
    proc = subprocess.run([sys.executable, "-m", "ltk.training.launch", "--standalone", "--nproc_per_node=2",
                           str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "RuntimeError: boom on rank 1" in proc.stderr  # the rank's own traceback
    assert "torchrun: rank 1 failed (exit code 1)" in proc.stderr
    assert "ChildFailedError" not in proc.stderr
