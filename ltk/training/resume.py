"""What a resumed run may change, checked before anything is written.

A resume is exact (N steps + resume + M steps == N + M uninterrupted steps) only if the batches go
on as they were: the same data, cut into the same windows, drawn in the same order, grouped into
the same global batch. So a resume may change the number of steps, the learning rate, the device,
the parallel layout (the loader's position is global, ltk/training/loader.py), but not:

    trainer.batch_size, trainer.grad_accum   the global batch (and with it each step's windows)
    trainer.seq_len                          the windows (0 means model.block_size: compared as resolved)
    trainer.seed                             the permutation of every epoch, the masks of BERT and T5
    data.*  (but cache_dir)                  the token stream itself
    task.*  (but eval_examples)              fine-tuning: the examples, their cut and batches
    adapter.*                                fine-tuning: what trains

Each is refused with the flag, the checkpoint's value and the new one. A --max-steps at or below
the checkpoint's step would train nothing (and still rewrite config.json): refused too.

`--resume auto` (`auto_resume`) builds the config from --preset / --config / flags as a fresh run
does, and continues the run folder's newest *valid* checkpoint if there is one (a torn or corrupt
newer one is skipped with a warning: ltk/training/checkpoint.py, newest_valid_checkpoint), else
starts fresh. So the same command line serves the first start, a `torchrun --max-restarts`
restart and a Slurm requeue. That config was not read from the checkpoint, so besides the fields
above it must describe the same model (family and every model.* field; a vocab_size of 0 is
the one the data gives, resolved alike): a model of another shape is refused here, by name, not
by a load error later.
"""
from __future__ import annotations

import os
import sys
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
    "task.kind": "the task would change",
    "task.base": "the model trained would change",
    "task.data": "the data would change",
    "task.max_len": "the examples would be cut differently",
    "task.packing": "the batches would change",
    "task.val_fraction": "the examples trained on would change",
    "task.limit": "the examples trained on would change",
    "task.stream": "the order of the examples would change",
    "task.stream_buffer": "the order of the examples would change",
    "task.chat_template": "the examples would be rendered differently",
    "adapter.method": "the parameters trained would change",
    "adapter.r": "the parameters trained would change",
    "adapter.alpha": "the adapters' scale would change",
    "adapter.dropout": "the adapters' training would change",
    "adapter.rslora": "the adapters' scale would change",
    "adapter.targets": "the parameters trained would change",
    "adapter.compute_dtype": "the parameters trained would change",
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


def check_same_model(cfg, state: dict[str, Any], ckpt: Path) -> None:
    """`--resume auto`: the config (from the preset, file and flags) must describe the checkpoint's model."""
    saved = type(cfg).from_dict(state["config"]).to_dict()
    new = cfg.to_dict()
    if saved["family"] != new["family"]:
        raise ResumeError(f"--resume auto: the config trains a {new['family']} model but the checkpoint {ckpt} "
                          f"holds a {saved['family']} one; give the preset or --config that run used, or another --out")
    for name, now in new["model"].items():
        old = saved["model"].get(name)
        if name == "vocab_size" and now == 0:  # 0: taken from the data, which EXACT already pins
            continue
        if old != now:
            raise ResumeError(
                f"--model.{name} is {now!r} but the checkpoint {ckpt} was trained with {old!r}: --resume auto "
                f"continues that run, so the model must be the same; resume with --model.{name} {old}, or start "
                "a new run in another --out")


def auto_resume(cfg, deep: bool = True) -> tuple[Path | None, dict[str, Any] | None]:
    """`--resume auto`: the newest valid checkpoint of cfg.trainer.out_dir and its state.json, checked
    against `cfg` (check_resume, check_same_model); (None, None) when there is none: a fresh start.
    `deep`: every file hashed (the process that claims the folder), else sizes and small files (each
    rank; ltk/training/checkpoint.py, newest_valid_checkpoint). Each skipped checkpoint is named on
    stderr (by the launcher, or by rank 0 of the ranks)."""
    from ltk.training.checkpoint import newest_valid_checkpoint, read_state

    found, skipped = newest_valid_checkpoint(cfg.trainer.out_dir, deep=deep)
    loud = os.environ.get("RANK", "0") == "0"
    for path, why in skipped if loud else ():
        print(f"ltk train: warning: --resume auto skips {path}: {why}", file=sys.stderr, flush=True)
    if found is None:
        if loud:
            print(f"ltk train: --resume auto: no valid checkpoint in {cfg.trainer.out_dir}: starting fresh",
                  file=sys.stderr, flush=True)
        return None, None
    path, state = read_state(found)
    check_same_model(cfg, state, path)
    check_resume(cfg, state, path)
    if loud:
        print(f"ltk train: --resume auto: continuing from {path} (step {state['step']})", file=sys.stderr, flush=True)
    return path, state
