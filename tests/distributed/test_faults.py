"""Faults never hang: a rank that raises, a rank that hangs, a rank that is killed, and a bad
setting all end the whole group with an error that says what happened, well within the
timeout."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc: no extra package needed)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


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
        ranks = [p for p in _descendants(proc.pid)
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
