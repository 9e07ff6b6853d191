"""A run's state in a checkpoint: what Trainer.save writes and what a resumed Trainer reads back.

Exact resume: a checkpoint holds the weights (with an adapter: the adapters only, the frozen
base referenced by path and checksums, ltk/training/base_model.py), the optimizer moments, the
GradScaler (fp16), the step, the tokens seen, the data-loader position and every RNG state
(device and host), so N steps + resume + N steps reproduces 2N uninterrupted steps bit for bit
on a CPU (tests/unit/test_trainer.py). Instruction tuning also keeps the score before training.

    trainer_state (per rank)   rng, scaler; one process: the optimizer state by parameter name
    state (rank 0, small)      step, tokens_seen, loader, host_rng, config, before, base
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ltk.training.base_model import check_reference
from ltk.training.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from ltk.training.reshard import load_local_state
from ltk.training.runtime import capture_host_rng, capture_rng, restore_rng
from ltk.training.sharded_checkpoint import open_reader, save_sharded

if TYPE_CHECKING:
    from ltk.training.trainer import Trainer


def save_run(tr: Trainer) -> Path | None:
    """A checkpoint of this step. Several processes: the sharded form, each rank writing what it
    holds (ltk/training/sharded_checkpoint.py; a collective). One process: the consolidated form,
    which every single-process reader and the HF export read directly; one process holds the
    whole model anyway, so sharding would save nothing."""
    trainer_state = {"rng": capture_rng()}
    if tr.scaler.is_enabled():
        trainer_state["scaler"] = tr.scaler.state_dict()
    state = {
        "step": tr.step,
        "tokens_seen": tr.tokens_seen,
        "loader": tr.train_loader.state_dict(),
        "host_rng": capture_host_rng(),
        "config": tr.cfg.to_dict(),
    }
    if tr.before is not None:
        state["before"] = tr.before
    if tr.base_ref is not None:
        state["base"] = tr.base_ref
    extra = {"tokenizer.json": tr.tokenizer_file}
    if tr.rt.world_size > 1:
        return save_sharded(tr.par, tr.run_dir, tr.step, trainer_state, state,
                            keep_last=tr.cfg.trainer.keep_last, extra_files=extra)
    trainer_state["optimizer"] = tr.par.optimizer_state_dict()  # by parameter name
    weights, names = tr.par.full_state_dict(), tr.par.checkpoint_names
    if names is not None:  # an adapter: its weights, not the frozen base's
        weights = {k: v for k, v in weights.items() if k in names}
    return save_checkpoint(tr.run_dir, tr.step, weights, trainer_state, state,
                           keep_last=tr.cfg.trainer.keep_last, extra_files=extra)


def load_run(tr: Trainer, ckpt: Checkpoint) -> None:
    """Every rank reads the boxes it holds, whichever layout wrote the checkpoint (sharded or
    consolidated; ltk/training/reshard.py), then the loader position, step and RNG states.
    Adapters: only theirs, on the base the checkpoint names, if that base has not changed."""
    if tr.base_ref is not None:
        check_reference(ckpt.state["base"], tr.base, ckpt.path)
    tr.before = ckpt.state.get("before")
    with open_reader(ckpt.path) as reader:
        if reader.by_position:  # a torch optimizer state dict by position, as single-process runs wrote before
            if tr.rt.world_size > 1:
                raise CheckpointError(f"{ckpt.path} holds its optimizer state by position (an older "
                                      "single-process run): resume it on one process")
            load_local_state(tr.par, reader, optimizer=False)
            tr.optimizer.load_state_dict(reader.trainer["optimizer"])
        else:
            load_local_state(tr.par, reader)
        meta = reader.trainer  # rng, scaler: small
        if "scaler" in meta:
            tr.scaler.load_state_dict(meta["scaler"])
        rng = meta["rng"]
    tr.train_loader.load_state_dict(ckpt.state["loader"])  # a global position, the same on every rank
    tr.step, tr.tokens_seen = ckpt.state["step"], ckpt.state["tokens_seen"]
    restore_rng(rng, ckpt.state["host_rng"])
