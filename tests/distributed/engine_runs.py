"""What the engine test files share: the spawned worker that trains a list of runs, and the
comparisons of a run folder against the single-process one (per-step losses, validation loss,
final weights). Worker functions live at module level so spawned processes can import them."""
import json

import pytest

from ltk.training.checkpoint import load_checkpoint
from ltk.training.trainer import Trainer


def train_jobs(rank, world, jobs):
    """Worker: train each (config, checkpoint to resume from or None) in turn in this group."""
    for cfg, ckpt in jobs:
        Trainer(cfg, resume=None if ckpt is None else load_checkpoint(ckpt)).fit()


def metrics(run) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(run) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run)}


def same_weights(wa, wb, tol=1e-5):
    """Norm-wise relative error ‖b − a‖ / ‖a‖ ≤ tol for every tensor (an element whose gradient
    is tiny can still move by a few 1e-6 under Adam when the reduction order changes)."""
    assert set(wb) <= set(wa) and set(wa) - set(wb) <= {"lm_head.weight"}  # a tied alias may be saved once
    for k in wb:
        err = ((wb[k] - wa[k]).norm() / wa[k].norm()).item()
        assert err <= tol, (k, err)


def same_run(single, run, last: int, tol=1e-5, grad_norm_tol: float | None = None):
    """`run` logged the steps `single` logged, with the same losses (and grad norms, when a
    tolerance is given), the same validation loss at step `last`, and the same final weights."""
    a, b = by_step(single), by_step(run)
    assert sorted(b) == sorted(a)
    for s, m in a.items():
        assert b[s]["loss"] == pytest.approx(m["loss"], rel=tol, abs=tol), s
        if grad_norm_tol is not None:
            assert b[s]["grad_norm"] == pytest.approx(m["grad_norm"], rel=grad_norm_tol, abs=1e-6), s
    assert b[last]["val_loss"] == pytest.approx(a[last]["val_loss"], rel=tol, abs=tol)
    same_weights(load_checkpoint(single).model, load_checkpoint(run).model, tol)


def resumed_exactly(whole, resumed, half: int, steps: int) -> None:
    """`resumed` (a run continued from `whole`'s step `half` checkpoint) logged steps half+1..steps
    with `whole`'s losses bit for bit, and ends on the same weights bit for bit."""
    a, b = metrics(whole), metrics(resumed)
    assert [m["step"] for m in b] == list(range(half + 1, steps + 1))
    assert [m["loss"] for m in a[half:]] == [m["loss"] for m in b]
    wa, wb = load_checkpoint(whole).model, load_checkpoint(resumed).model
    assert wa.keys() == wb.keys() and all(v.equal(wb[k]) for k, v in wa.items())
