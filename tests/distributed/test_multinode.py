"""Runs beyond one launcher: two "nodes" on one machine (two `ltk train --nnodes 2` launches meeting
in a c10d rendezvous on localhost) train what one node with the same world size trains, through a
restart of both nodes; on one node too, a rank killed mid-run under `--max-restarts 1 --resume auto`
is restarted with its group and the run ends with the very parameters of one never interrupted;
every rank checks that it sees the run folder.
All on CPU processes (gloo), each launch under a timeout; one uninterrupted 2-process run serves
as the reference of both launch tests."""
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ltk.parallel.dist import spawn
from ltk.training.checkpoint import list_checkpoints, load_checkpoint

TIMEOUT = 240
STEPS = 8
KEYS = ("step", "loss", "lr", "grad_norm", "tokens")


def _env(**extra):
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def _argv(corpus, out, *extra):
    return [sys.executable, "-m", "ltk.cli", "train", "--data", str(corpus), "--out", str(out), "--max-steps",
            str(STEPS), "--model.vocab_size", "0", "--model.block_size", "32", "--model.n_layer", "1",
            "--model.n_head", "2", "--model.n_embd", "32", "--data.vocab_size", "300", "--data.min_chars", "16",
            "--trainer.batch_size", "4", "--trainer.eval_every", "0", "--trainer.log_every", "1",
            "--trainer.progress", "false", "--trainer.ckpt_every", "2", "--optim.warmup_steps", "2",
            "--trainer.timeline", "false", "--parallel", "ddp", *extra]


def _run(argv, **env):
    done = subprocess.run(argv, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(run):
    return [[r[k] for k in KEYS] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _same_params(a, b):
    wa, wb = load_checkpoint(a).model, load_checkpoint(b).model
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_node(tiny_corpus, tmp_path_factory):
    """The reference: one launcher, 2 processes, never interrupted."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    _run(_argv(tiny_corpus, out, "--nproc", "2"))
    return out


def test_two_nodes_train_what_one_node_trains_through_a_restart(tiny_corpus, tmp_path, one_node):
    """Two launches with --nnodes 2 --nproc 1 meet in a c10d rendezvous on localhost. Node 1 is started
    first, so it joins first and may hold global rank 0: the folder is still claimed by the launcher of
    --node-rank 0, and every rank sees it (the shared-folder check). Node 1's rank SIGKILLs itself after
    step 5 (LTK_FAULT in node 1's environment only, first attempt only): its agent restarts it and
    rejoins, node 0's restarts too, and the group continues from step 4. The run ends with the one-node
    run's losses and weights, bit for bit; the first attempt provably got past step 4 (one restart
    allowed, and it continued from there), so the run without a restart works too."""
    out, endpoint = tmp_path / "run", f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(_argv(tiny_corpus, out, "--nproc", "1", "--nnodes", "2", "--node-rank", str(r),
                                    "--rdzv-endpoint", endpoint, "--resume", "auto", "--max-restarts", "1",
                                    "--dist-timeout", "60"),
                              env=_env(**({"LTK_FAULT": "kill:0:5"} if r == 1 else {})), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    try:
        ends = [p.communicate(timeout=TIMEOUT) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, ends):
        assert p.returncode == 0, err[-3000:]
    err = ends[0][1] + ends[1][1]
    assert "--rdzv-backend=c10d" in err
    assert err.count("continuing from") == 1 and "step_000004 (step 4)" in err, err[-3000:]  # the restarted rank 0
    assert _rows(out) == _rows(one_node) and len(_rows(out)) == STEPS  # the same losses, bit for bit
    assert _same_params(out, one_node)
    assert not (out / ".lock").exists() and not (out / ".ltk-shared-check").exists()  # released, cleaned


def test_a_killed_rank_restarts_and_the_run_continues_exactly(tiny_corpus, tmp_path, one_node):
    """One node, 2 processes: rank 1 SIGKILLs itself after training step 5 (LTK_FAULT, first attempt
    only); torchrun stops rank 0 and starts both again; --resume auto finds step 4, metrics.jsonl is
    cut back to it, and steps 5..8 train again. The run ends where the uninterrupted one does, bit for bit."""
    out = tmp_path / "run"
    done = _run(_argv(tiny_corpus, out, "--nproc", "2", "--resume", "auto", "--max-restarts", "1",
                      "--dist-timeout", "60"), LTK_FAULT="kill:1:5")
    assert "no valid checkpoint" in done.stderr  # the first attempt started fresh
    assert "continuing from" in done.stderr and "step_000004 (step 4)" in done.stderr, done.stderr[-3000:]
    assert [r[0] for r in _rows(out)] == list(range(1, STEPS + 1))  # one row per step: the rows after 4 were cut
    assert _rows(out) == _rows(one_node)
    assert list_checkpoints(out)[-1].name == f"step_{STEPS:06d}" and _same_params(out, one_node)


def _check_folders(rank, world, root):
    """Three starts in one process group: the same folder (passes, the token is removed), a folder of
    the same name that rank 1 does not share, and ranks that would resume different checkpoints."""
    from pathlib import Path

    from ltk.training.run_folder import RunFolder, RunFolderError
    from ltk.training.shared_folder import TOKEN, check_shared_folder

    rt = SimpleNamespace(rank=rank, world_size=world, is_main=rank == 0)
    shared, mine = Path(root) / "shared", Path(root) / f"local{rank}"
    out = []
    with RunFolder(shared).lock() if rank == 0 else RunFolder(shared), RunFolder(mine).lock():
        check_shared_folder(shared, rt, None)
        torch.distributed.barrier()
        out.append((shared / TOKEN).exists())
        for path, resume in ((mine, None), (shared, Path(f"step_00000{rank}"))):
            try:
                check_shared_folder(path, rt, resume)
                out.append(None)
            except RunFolderError as e:
                out.append(str(e))
    return out


def test_every_rank_must_see_the_run_folder(tmp_path):
    ranks = spawn(_check_folders, 2, str(tmp_path), timeout_s=120)
    assert ranks[0] == ranks[1]  # every rank raises the same error
    token_left, not_shared, other_checkpoint = ranks[0]
    assert token_left is False
    assert f"run folder {tmp_path / 'local0'} is not shared by every rank: rank 1 on {socket.gethostname()} " \
           f"(its --out: {tmp_path / 'local1'}) cannot read rank 0's token" in not_shared
    assert "same --out" in not_shared
    assert "different checkpoints" in other_checkpoint and "rank 1 on" in other_checkpoint


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    """--dist-timeout S is passed to the ranks as LTK_DIST_TIMEOUT and on to init_process_group."""
    from datetime import timedelta

    import torch.distributed as dist

    from ltk.training import runtime

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(b=backend, t=timeout))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LTK_DIST_TIMEOUT", "42")
    runtime.setup_runtime("cpu", "fp32")
    assert seen == {"b": "gloo", "t": timedelta(seconds=42)}
    monkeypatch.delenv("LTK_DIST_TIMEOUT")
    runtime.setup_runtime("cpu", "fp32")
    assert seen["t"] is None  # torch's default
