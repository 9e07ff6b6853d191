"""What the Trainer builds before its engine, by task: the model, the objective, the sequence
length, the tokenizer file a checkpoint carries, and the loaders.

    pre-training          the prepared data (ltk/training/data.py), the family's objective, the
                          vocabulary sized to the tokenizer, the model, token-window loaders
    instruction tuning    the base with its adapter (ltk/training/instruct_setup.py: whole, or on
                          meta, loaded shard by shard as the engine is built), its tokenizer; the
                          examples and their loader (ltk/training/instruct_run.py)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ltk.models.init import build_on_meta, move_buffers
from ltk.training.base_stream import BaseReader
from ltk.training.instruct_run import InstructTask
from ltk.training.instruct_setup import adapted_on_meta, sharded_setup, whole_base
from ltk.training.loader import TokenLoader
from ltk.training.objectives import Instruct, objective_for

if TYPE_CHECKING:
    from ltk.training.data import PreparedData
    from ltk.training.trainer import Trainer


def setup_pretrain(tr: Trainer, data: PreparedData) -> None:
    """Pre-training on `data` (rank 0 prepared it, Trainer._prepare_data): the family's objective,
    model.vocab_size from the tokenizer (0: its size), the model and the token-window loaders."""
    t, m = tr.cfg.trainer, tr.cfg.model
    tr.data = data
    tr.tokenizer_file = tr.data.path / "tokenizer.json"
    tr.objective = objective_for(tr.cfg.family, tr.data.vocab_size, tr.data.eot_id)
    need = tr.data.vocab_size + tr.objective.extra_tokens  # + [MASK] / sentinels
    if m.vocab_size == 0:
        m.vocab_size = need
    elif need > m.vocab_size:
        raise ValueError(
            f"the tokenizer has {tr.data.vocab_size} tokens (+{tr.objective.extra_tokens} for the "
            f"{tr.objective.name} objective) but model.vocab_size is {m.vocab_size}; "
            f"set --model.vocab_size {need} or lower --data.vocab_size"
        )
    tr.seq_len = t.seq_len or m.block_size  # check_run: T5 (no block_size) names its seq_len

    tr.model = build_model(tr)
    tr.model.activation_checkpointing = t.activation_checkpointing
    # every rank reads the same global batch and trains on its rows (ltk/parallel/strategy.py)
    tr.train_loader = TokenLoader(tr.data.train_files, tr.seq_len, t.batch_size, seed=t.seed)
    tr.val_loader = TokenLoader(tr.data.val_files, tr.seq_len, t.batch_size, seed=t.seed)
    tr.token_bytes = torch.as_tensor(tr.data.tokenizer.token_byte_lengths(), dtype=torch.long)


def setup_instruct(tr: Trainer) -> None:
    """Instruction tuning: the base with its adapter (ltk/training/instruct_setup.py: whole, or on
    meta, loaded shard by shard as the engine is built), its tokenizer; the examples and their
    loader (ltk/training/instruct_run.py)."""
    from ltk.training.tokenizer import Tokenizer

    cfg = tr.cfg
    tr.tokenizer_file = tr.base.tok_dir / "tokenizer.json"
    tr.task = InstructTask(cfg, Tokenizer.load(tr.base.tok_dir))
    tr.objective = Instruct()
    tr.seq_len = cfg.task.max_len
    # zero3 / fsdp2: built on meta, each rank reading its shard of the base as the engine is built;
    # else whole, scored before training (a resumed run reads that score from its checkpoint)
    if sharded_setup(cfg, tr.rt.world_size):
        tr.base_reader = BaseReader(tr.base)
        tr.model = adapted_on_meta(build_model(tr), cfg, tr.base_reader, tr.rt.device)
    else:
        tr.model, tr.before = whole_base(build_model(tr, shardable=False), cfg, tr.base, tr.task,
                                         tr.rt.device, tr.rt.autocast(), tr.resume is None)
    tr.model.activation_checkpointing = cfg.trainer.activation_checkpointing
    tr.train_loader = tr.task.loader


def build_model(tr: Trainer, shardable: bool = True) -> torch.nn.Module:
    """The model, whole on this device, or — where the engine shards it (ZeRO-3, tensor and
    pipeline parallelism) — with its parameters on the meta device, so that each rank only
    ever makes its own shard (ltk/models/init.py; the engine materializes it). Either way
    the weights are those of one process with this seed; the global RNG is left as it was."""
    p = tr.cfg.parallel
    sharded = shardable and tr.rt.world_size > 1 and (p.strategy in ("zero3", "fsdp2") or p.tp > 1 or p.pp > 1)
    build = lambda: tr.family.model_cls(tr.cfg.model)  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        if sharded:
            return move_buffers(build_on_meta(build), tr.rt.device)
        return build().to(tr.rt.device)
