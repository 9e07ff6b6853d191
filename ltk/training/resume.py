"""What a resumed run may change, checked before anything is written.

A resume is exact (N steps + resume + M steps == N + M uninterrupted steps) only if the batches go
on as they were: the same data, cut into the same windows, drawn in the same order, grouped into
the same global batch. So a resume may change the number of steps, the learning rate, the device,
the parallel layout (the loader's position is global, ltk/training/loader.py), but not:

    trainer.batch_size, trainer.grad_accum   the global batch (and with it each step's windows)
    trainer.seq_len                          the windows (0 means model.block_size: compared as resolved)
    trainer.seed                             the permutation of every epoch, the masks of BERT and T5
    data.*  (but cache_dir)                  the token stream itself

Each is refused with the flag, the checkpoint's value and the new one. A --max-steps at or below
the checkpoint's step would train nothing (and still rewrite config.json): refused too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

EXACT = {
    "trainer.batch_size": "the global batch would change",
    "trainer.grad_accum": "the global batch would change",
    "trainer.seq_len": "the windows the data is cut into would change",
    "trainer.seed": "the order of the data would change",
    "data.source": "the data would change",
    "data.text_field": "the data would change",
    "data.tokenizer": "the token stream would change",
    "data.vocab_size": "the token stream would change",
    "data.min_chars": "the data would change",
    "data.val_fraction": "the data would change",
    "data.max_bytes": "the data would change",
}


class ResumeError(ValueError):
    """A resume that would not continue the checkpoint's run exactly, or would do nothing."""


def _get(cfg: dict[str, Any], path: str) -> Any:
    section, name = path.split(".")
    value = cfg.get(section, {}).get(name)
    if path == "trainer.seq_len" and not value:  # 0: the model's block_size
        value = cfg.get("model", {}).get("block_size")
    return value


def check_resume(cfg, state: dict[str, Any], ckpt: Path) -> None:
    """Refuse resuming the checkpoint at `ckpt` (its state.json is `state`) with the run config `cfg`
    where that run would not be the checkpoint's run continued exactly."""
    step = state["step"]
    if cfg.trainer.max_steps <= step:
        raise ResumeError(
            f"--max-steps (trainer.max_steps) is {cfg.trainer.max_steps}, but the checkpoint {ckpt} is at step "
            f"{step}: nothing is left to train; pass a larger --max-steps, e.g. --max-steps {2 * step}")
    saved, new = type(cfg).from_dict(state["config"]).to_dict(), cfg.to_dict()  # the defaults filled in alike
    for path, why in EXACT.items():
        old, now = _get(saved, path), _get(new, path)
        if old != now:
            raise ResumeError(
                f"--{path} is {now!r} but the checkpoint {ckpt} was trained with {old!r}: {why}, so the resumed "
                f"run would not continue it exactly; resume with --{path} {old}, or start a new run in another "
                "--out to change it")
