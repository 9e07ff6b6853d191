"""Bad input to `ltk finetune`, `plan`, `generate`, to the output folders of every command that
writes, and to a multi-process run: each is one line `ltk CMD: error: ...` naming the flag or
the path (exit code 2), before any work is done, never a traceback."""
import json
import os

import pytest

from ltk.cli import main

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _refused(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    return err


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
