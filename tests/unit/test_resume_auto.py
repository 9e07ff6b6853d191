"""`ltk train --resume auto`: a fresh start in a folder without checkpoints, a continuation from the
newest *valid* one otherwise (a corrupt newest one skipped and moved aside), bit for bit the
run that was never stopped; a config that does not match the checkpoint is refused by name.
The launcher's flags (--nnodes, --max-restarts, ...) are checked before anything starts."""
import json
from types import SimpleNamespace

import pytest
import torch

from ltk.cli import main
from ltk.training.checkpoint import list_checkpoints, load_checkpoint, newest_valid_checkpoint
from ltk.training.rendezvous import Rendezvous, rank_argv


def _argv(corpus, out, steps, *extra):
    # the schedule does not depend on --max-steps (decay_steps fixed): a run continued to N follows
    # the learning rates of one started for N
    return ["train", "--data", str(corpus), "--out", str(out), "--max-steps", str(steps), "--model.vocab_size", "0",
            "--model.block_size", "32", "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
            "--model.dropout", "0.1", "--data.vocab_size", "300", "--data.min_chars", "16", "--trainer.batch_size",
            "4", "--trainer.eval_every", "0", "--trainer.log_every", "1", "--trainer.progress", "false",
            "--trainer.ckpt_every", "2", "--optim.warmup_steps", "2", "--optim.decay_steps", "20", *extra]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_auto_starts_fresh_continues_and_skips_a_corrupt_checkpoint(tiny_corpus, tmp_path, capsys):
    run, full = tmp_path / "run", tmp_path / "full"
    assert main(_argv(tiny_corpus, run, 4, "--resume", "auto")) == 0  # an empty folder: a fresh start
    assert "no valid checkpoint" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]

    newest = run / "checkpoints" / "step_000004" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit-pattern: the manifest's hash no longer matches
    newest.write_bytes(bytes(data))
    assert newest_valid_checkpoint(run, deep=False)[0].name == "step_000002"  # small files: hashed by every rank
    assert main(_argv(tiny_corpus, run, 8, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "skips" in err and "step_000004" in err and "checksum mismatch" in err, err
    assert "continuing from" in err and "step_000002 (step 2)" in err, err
    assert (run / "checkpoints" / ".corrupt-step_000004").is_dir()  # kept to be looked at, read by nothing

    assert main(_argv(tiny_corpus, full, 8)) == 0  # the run that was never stopped
    keys = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [[r[k] for k in keys] for r in _rows(run)] == [[r[k] for k in keys] for r in _rows(full)]
    a, b = load_checkpoint(run).model, load_checkpoint(full).model
    assert load_checkpoint(run).state["step"] == 8 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a config that is not the checkpoint's: refused by name, before anything trains
    capsys.readouterr()
    assert main(_argv(tiny_corpus, run, 10, "--resume", "auto", "--trainer.batch_size", "8")) == 2
    assert "--trainer.batch_size is 8 but the checkpoint" in capsys.readouterr().err
    assert main(_argv(tiny_corpus, run, 10, "--resume", "auto", "--model.n_embd", "64")) == 2
    assert "--model.n_embd is 64 but the checkpoint" in capsys.readouterr().err
    assert main(_argv(tiny_corpus, run, 8, "--resume", "auto")) == 2  # nothing left to train
    assert "nothing is left to train" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--max-restarts", "1", "--nproc", "2"], "add --resume auto"),
    (["--resume", "auto", "--overwrite"], "give one"),
    (["--nnodes", "2", "--node-rank", "0"], "--master-addr HOST"),
    (["--nnodes", "2", "--master-addr", "h"], "--node-rank 0..1"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2: must be in 0..1"),
    (["--master-addr", "h", "--rdzv-endpoint", "h:1"], "not both"),
    (["--rdzv-id", "x"], "--rdzv-id goes with --rdzv-endpoint"),
    (["--nnodes", "2", "--node-rank", "0", "--master-addr", "h", "--resume", "auto", "--max-restarts", "1"],
     "use the c10d rendezvous"),
    (["--dist-timeout", "0"], "--dist-timeout 0.0: must be > 0"),
])
def test_launcher_flags_are_checked_before_anything_starts(argv, needle, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_torchrun_arguments_of_each_rendezvous():
    def args(**kw):
        base = dict(nproc=2, nnodes=1, node_rank=None, master_addr=None, master_port=None, rdzv_endpoint=None,
                    rdzv_id=None, max_restarts=0, resume=None)
        return Rendezvous.from_args(SimpleNamespace(**{**base, **kw})).torchrun_args("runs/x")

    assert args() == ["--standalone", "--nproc-per-node=2"]
    assert args(max_restarts=3, resume="auto") == ["--standalone", "--nproc-per-node=2", "--max-restarts=3"]
    assert args(nnodes=2, node_rank=1, master_addr="n0", master_port=1234) == [
        "--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--master-addr=n0", "--master-port=1234"]
    c10d = args(nnodes=2, node_rank=0, rdzv_endpoint="n0:29400")
    assert c10d[:4] == ["--nproc-per-node=2", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=n0:29400"]
    assert c10d[4].startswith("--rdzv-id=ltk-")  # the same on every node: derived from --out
    assert args(nnodes=2, node_rank=0, rdzv_endpoint="n0:1", rdzv_id="job7")[-1] == "--rdzv-id=job7"
    assert rank_argv(["--nproc", "2", "--nnodes=2", "--node-rank", "1", "--rdzv-endpoint", "h:1", "--resume", "auto",
                      "--max-restarts", "1", "--dist-timeout", "60"]) == ["--resume", "auto", "--dist-timeout", "60"]
