"""Faults never hang: a rank that raises, a rank that hangs, a rank that is killed, and a bad
setting all end the whole group with an error that says what happened, well within the
timeout. A Ctrl-C stops every rank after the same step with a checkpoint that resumes exactly,
and a second run on a folder in use is refused."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltk.bench.parallel_memory import process_tree
from ltk.parallel.dist import Comm, SpawnError, spawn


def _raises_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("bad shard on rank 1")
    Comm().all_reduce(torch.ones(4))  # rank 0 waits here for a peer that will never come


def _hangs_on_rank_1(rank, world):
    if rank == 1:
        time.sleep(3600)
    Comm().all_reduce(torch.ones(4))


def test_a_rank_that_raises_takes_the_group_down_naming_it():
    t0 = time.monotonic()
    with pytest.raises(SpawnError, match=r"rank 1 raised:(.|\n)*bad shard on rank 1"):
        spawn(_raises_on_rank_1, 2, timeout_s=60)
    assert time.monotonic() - t0 < 30


def test_a_hang_fails_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(SpawnError, match=r"timed out after 8 s waiting for ranks \[0, 1\]"):
        spawn(_hangs_on_rank_1, 2, timeout_s=8)
    assert time.monotonic() - t0 < 30


def _args(corpus, out, steps):
    return ["--data", str(corpus), "--out", str(out), "--max-steps", str(steps), "--model.vocab_size", "0",
            "--model.block_size", "32", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
            "--data.vocab_size", "300", "--data.min_chars", "16", "--trainer.eval_every", "0",
            "--trainer.log_every", "1", "--trainer.progress", "false"]


def test_a_bad_setting_fails_on_every_rank_with_its_name(tiny_corpus, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ltk.cli", "train", "--parallel", "zero2", "--nproc", "2",
                           *_args(tiny_corpus, tmp_path / "run", 3), "--trainer.batch_size", "3"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not split over 2 data-parallel ranks" in proc.stderr


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc (Linux)")
def test_a_killed_rank_ends_the_run_and_keeps_the_last_checkpoint(tiny_corpus, tmp_path):
    """SIGKILL one rank of a 2-process run mid-training: the launcher ends the job (no hang),
    and the checkpoint written before is intact and loads."""
    from ltk.training.checkpoint import load_checkpoint

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ltk.cli", "train", "--parallel", "ddp", "--nproc", "2",
                             *_args(tiny_corpus, out, 100000), "--trainer.ckpt_every", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoints/step_*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(out.glob("checkpoints/step_*")), "no checkpoint was written within 120 s"
        ranks = [p for p in process_tree(proc.pid)[1:]
                 if b"ltk.cli" in Path(f"/proc/{p}/cmdline").read_bytes() and b"\nRANK=1\n" in _environ(p)]
        assert ranks, "rank 1 not found"
        os.kill(ranks[0], signal.SIGKILL)
        t0 = time.monotonic()
        rc = proc.wait(timeout=120)
        assert rc != 0 and time.monotonic() - t0 < 120
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = load_checkpoint(out)  # verified against its manifest: complete, not half-written
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ckpt.state["step"] % 2 == 0 and ckpt.state["step"] <= max(steps)


def _environ(pid: int) -> bytes:
    try:
        return b"\n" + Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n")
    except OSError:
        return b""


def _env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _stop_args(corpus, out, steps, *extra):
    """_args with a schedule that does not depend on --max-steps, so a run stopped early and resumed
    to N steps follows the same learning rates as one started for N steps."""
    return ["train", *_args(corpus, out, steps), "--trainer.batch_size", "4", "--trainer.eval_batches", "2",
            "--optim.warmup_steps", "2", "--optim.decay_steps", "40", *extra]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_for_rows(proc, run, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} metrics rows within {timeout} s (exit status {proc.poll()})")


def _second_run_is_refused(corpus, run, holder, capsys):
    """A second run on a folder in use is refused at once, with or without --overwrite, naming the holder."""
    from ltk.cli import main

    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(_stop_args(corpus, run, 5, *extra)) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {holder} " in err, err


def _interrupt(proc, timeout=120):
    """SIGINT `proc`; its exit status and the step it says it stopped after."""
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    found = re.search(r"stopped by SIGINT after step (\d+)", out)
    assert found, out[-2000:] + err[-3000:]
    return proc.returncode, int(found.group(1))


def _interrupted_run(tiny_corpus, run, argv, rows, capsys) -> int:
    """Start `ltk <argv>`, wait for `rows` metrics rows, check that a second run on its folder is
    refused naming it, SIGINT it; it must exit 130 with its checkpoint and metrics at the step it
    stopped after, which is returned."""
    from ltk.training.checkpoint import load_checkpoint

    proc = subprocess.Popen([sys.executable, "-m", "ltk.cli", *argv], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(proc, run, rows)
        _second_run_is_refused(tiny_corpus, run, proc.pid, capsys)
        rc, step = _interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130
    assert load_checkpoint(run).state["step"] == step and [r["step"] for r in _rows(run)] == list(range(1, step + 1))
    return step


def test_ctrl_c_saves_at_a_step_boundary_and_the_resume_is_exact(tiny_corpus, tmp_path, capsys):
    """SIGINT a running `ltk train`: it finishes the step, saves, exits 130; resumed, it reproduces an
    uninterrupted run bit for bit (dropout on, so the RNG states count). Meanwhile a second run on
    its folder is refused naming its pid, and the first is not disturbed."""
    from ltk.training.checkpoint import load_checkpoint

    run, full = tmp_path / "run", tmp_path / "full"
    dropout = ("--model.dropout", "0.1")
    step = _interrupted_run(tiny_corpus, run, [*_stop_args(tiny_corpus, run, 100000, *dropout)], 3, capsys)
    total = str(step + 4)
    for argv in (["train", "--resume", str(run), "--max-steps", total], _stop_args(tiny_corpus, full, total, *dropout)):
        done = subprocess.run([sys.executable, "-m", "ltk.cli", *argv], env=_env(), capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    assert [[r.get(k) for k in keys] for r in _rows(run)] == [[r.get(k) for k in keys] for r in _rows(full)]
    a, b = load_checkpoint(run).model, load_checkpoint(full).model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_stops_every_rank_after_the_same_step(tiny_corpus, tmp_path, capsys):
    """SIGINT the launcher of a 2-process run: every rank finishes the same step, rank 0 saves it, the
    job exits 130 (no hang, no rank killed). While it ran, the launcher held the folder. Resumed in
    one process it continues the same batches as an uninterrupted single-process run."""
    from ltk.cli import main

    run, single = tmp_path / "run", tmp_path / "single"
    argv = [*_stop_args(tiny_corpus, run, 100000), "--parallel", "ddp", "--nproc", "2"]
    step = _interrupted_run(tiny_corpus, run, argv, 2, capsys)
    total = str(step + 3)
    # one process must say so: a ddp run resumed without --nproc is refused rather than silently unreplicated
    assert main(["train", "--resume", str(run), "--max-steps", total]) == 2
    assert "--parallel.strategy auto" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", total, "--parallel.strategy", "auto"]) == 0
    assert main(_stop_args(tiny_corpus, single, total)) == 0
    a, b = _rows(run), _rows(single)
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b):  # the ranks sum gradients in another order: equal to rounding, not bit for bit
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-4), ra["step"]
