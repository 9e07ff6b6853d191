"""Run folders never mix two runs: a fresh run refuses a folder that holds one (or replaces it with
--overwrite), one run at a time holds the folder's lock, a resume cuts metrics.jsonl back to its
checkpoint, and a resume that could not be exact or would do nothing is refused before anything
is written."""
import json
import os
import signal
import subprocess
import sys

import pytest

from ltk.cli import main
from ltk.training.checkpoint import list_checkpoints, load_checkpoint
from ltk.training.config import RunConfig
from ltk.training.resume import ResumeError
from ltk.training.run_folder import RunFolder, RunFolderError, claim_run_folder
from ltk.training.stop import StopOnSignal
from ltk.training.trainer import Trainer


def _train_args(corpus, out, steps, *extra):
    return ["train", "--data", str(corpus), "--out", str(out), "--max-steps", str(steps), "--model.n_layer", "1",
            "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "32", "--data.vocab_size", "300",
            "--data.min_chars", "16", "--trainer.batch_size", "4", "--trainer.eval_batches", "1",
            "--trainer.progress", "false", "--trainer.log_every", "1", "--optim.decay_steps", "10", *extra]


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpts(run):
    return [p.name for p in list_checkpoints(run)]


def test_a_fresh_run_into_a_folder_with_a_run_is_refused_and_the_old_run_kept(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_corpus, run, 3)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(_train_args(tiny_corpus, run, 2)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "step_000003" in err and "Traceback" not in err
    assert f"--resume {run}" in err and "--overwrite" in err
    assert main(_train_args(tiny_corpus, run, 2, "--nproc", "2")) == 2  # refused before any process starts
    err = capsys.readouterr().err
    assert "already holds a run" in err and "launching" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert _ckpts(run) == ["step_000003"] and _steps(run) == [1, 2, 3]
    load_checkpoint(run)


def test_overwrite_replaces_the_old_run_and_keeps_other_files(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    assert main(_train_args(tiny_corpus, run, 3, "--trainer.ckpt_every", "1")) == 0
    (run / "notes.txt").write_text("mine")
    assert main(_train_args(tiny_corpus, run, 2, "--overwrite")) == 0
    assert _ckpts(run) == ["step_000002"] and _steps(run) == [1, 2]
    assert load_checkpoint(run).state["config"]["trainer"]["max_steps"] == 2
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: left alone


def test_a_held_folder_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    with claim_run_folder(run):
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()} on "):
            claim_run_folder(run, overwrite=True)
    claim_run_folder(run).release()  # released: free again
    code = ("import os, signal; from ltk.training.run_folder import RunFolder; "
            f"RunFolder({str(run)!r}).lock(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert f"pid {proc.pid} " in (run / ".lock").read_text()  # it held the lock when it died
    with claim_run_folder(run):  # the kernel released it
        assert f"pid {os.getpid()} " in (run / ".lock").read_text()


def test_a_run_that_wrote_nothing_leaves_nothing_behind(tmp_path):
    with claim_run_folder(tmp_path / "new" / "run") as folder:
        assert f"pid {os.getpid()} " in (folder.path / ".lock").read_text()
    assert list(tmp_path.iterdir()) == []  # a refused or failed run does not litter --out's parents


def test_resume_cuts_metrics_back_to_the_checkpoint(tiny_config, tmp_path, monkeypatch):
    """A crash after step 5 was logged but with step 4 the last checkpoint: the resumed run trains
    step 5 again and the log holds it once."""
    cfg = tiny_config(tmp_path / "run", max_steps=8, ckpt_every=2, eval_every=0)
    step = Trainer.train_step

    def crash_after_5(self):
        if self.step == 5:
            raise RuntimeError("node lost")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_after_5)
    with pytest.raises(RuntimeError, match="node lost"):
        Trainer(cfg).fit()
    monkeypatch.undo()
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5] and _ckpts(tmp_path / "run")[-1] == "step_000004"
    ck = load_checkpoint(tmp_path / "run")
    Trainer(RunConfig.from_dict(ck.state["config"]), resume=ck).fit()
    assert _steps(tmp_path / "run") == list(range(1, 9))


def test_trim_metrics_keeps_earlier_rows_and_drops_a_torn_line(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    RunFolder(tmp_path).trim_metrics(2)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_resume_mistakes_are_refused_before_anything_is_written(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_corpus, run, 3)) == 0
    config = (run / "config.json").read_bytes()
    capsys.readouterr()
    resume = ["train", "--resume", str(run), "--trainer.progress", "false"]
    assert main(resume + ["--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--max-steps" in err and "at step 3" in err and "larger --max-steps" in err
    for flag, value, saved in (("--trainer.grad_accum", "2", "1"), ("--trainer.batch_size", "8", "4"),
                               ("--trainer.seq_len", "16", "32")):
        assert main(resume + ["--max-steps", "6", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} is {value}" in err and f"trained with {saved}" in err, err
    assert (run / "config.json").read_bytes() == config and _steps(run) == [1, 2, 3]


def test_library_resume_with_another_global_batch_is_refused(tiny_config, tmp_path):
    Trainer(tiny_config(tmp_path / "run", max_steps=2)).fit()
    ck = load_checkpoint(tmp_path / "run")
    cfg = RunConfig.from_dict(ck.state["config"])
    cfg.trainer.max_steps, cfg.trainer.grad_accum = 4, 2
    with pytest.raises(ResumeError, match="--trainer.grad_accum is 2 .* trained with 1"):
        Trainer(cfg, resume=ck)


def test_resuming_an_older_checkpoint_beside_newer_ones_is_refused(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tiny_corpus, run, 4, "--trainer.ckpt_every", "2")) == 0
    capsys.readouterr()
    old = run / "checkpoints" / "step_000002"
    assert main(["train", "--resume", str(old), "--max-steps", "6"]) == 2
    assert "would mix two histories" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--overwrite"]) == 2
    assert "drop --overwrite" in capsys.readouterr().err
    assert main(["train", "--resume", str(old), "--max-steps", "3", "--out", str(tmp_path / "fork"),
                 "--trainer.progress", "false"]) == 0  # the older one, continued in a new folder
    assert _steps(tmp_path / "fork") == [3] and _ckpts(run) == ["step_000002", "step_000004"]


def test_the_first_signal_asks_to_stop_and_a_ctrl_c_after_it_stops_at_once():
    class OneProcess:
        world_size = 1

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal(OneProcess(), announce=False) as stop:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # repeated, as schedulers do: still a stop at the step boundary
        assert stop.agreed() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before
