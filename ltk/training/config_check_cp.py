"""The checks of `--parallel.cp` (context parallelism, ltk/parallel/cp_train.py), called by
ltk/training/config_check.py: what the sequence split runs with, and what it refuses by name.

    fields      cp >= 1; cp_impl ring | ulysses; cp_layout zigzag | contiguous; at cp 1 the
                other two are not read, so a value other than the default is refused
    what runs   GPT and Llama pre-training (the causal LM on unpacked windows), with our DDP,
                ZeRO-1/2/3, torch-ddp or FSDP2, and tensor parallelism (ours, or fsdp2 x DTensor TP)
    shape       T >= 2·cp (every rank holds two chunks of the 2·cp); Ulysses gives each of the
                cp·tp ranks whole heads: n_head % (cp·tp) == 0 (ltk/parallel/cost_cp.py check_cp)
"""
from __future__ import annotations

from ltk.training.config import ConfigError, RunConfig

IMPLS = ("ring", "ulysses")
LAYOUTS = ("zigzag", "contiguous")
ENGINES = ("auto", "ddp", "naive-ddp", "zero1", "zero2", "zero3", "torch-ddp", "fsdp2")


def heads_of(cfg: RunConfig) -> tuple[int, int]:
    """(query heads, key/value heads) of a GPT or Llama config."""
    m = cfg.model
    return m.n_head, getattr(m, "n_kv_head", m.n_head)


def check_cp(cfg: RunConfig) -> None:
    """Everything about --parallel.cp that does not depend on the world size."""
    p, t = cfg.parallel, cfg.trainer
    if p.cp < 1:
        raise ConfigError(f"--parallel.cp must be >= 1, got {p.cp}")
    for name, value, choices in (("cp_impl", p.cp_impl, IMPLS), ("cp_layout", p.cp_layout, LAYOUTS)):
        if value not in choices:
            raise ConfigError(f"--parallel.{name} {value!r} is not one of {', '.join(choices)}")
    if p.cp == 1:
        if (p.cp_impl, p.cp_layout) != (IMPLS[0], LAYOUTS[0]):
            raise ConfigError("--parallel.cp_impl / --parallel.cp_layout choose how context parallelism splits the "
                              "sequence: they need --parallel.cp > 1")
        return
    flag = f"--parallel.cp {p.cp}"
    if cfg.family not in ("gpt", "llama"):
        raise ConfigError(f"{flag}: context parallelism splits the causal attention of gpt and llama, not "
                          f"{cfg.family} ({'masked LM, bidirectional' if cfg.family == 'bert' else 'encoder-decoder'}"
                          " attention is not wired)")
    if cfg.task.kind != "pretrain":
        raise ConfigError(f"{flag}: context parallelism trains pre-training windows; instruction tuning (packed rows "
                          "with segment ids, prompt-masked labels) is not wired: drop --parallel.cp")
    if p.pp > 1:
        raise ConfigError(f"{flag} with --parallel.pp {p.pp}: pipeline stages over split sequences are not wired; "
                          "drop one")
    if p.strategy not in ENGINES:
        raise ConfigError(f"{flag} with --parallel.strategy {p.strategy}: context parallelism runs with "
                          f"{', '.join(ENGINES)} (dp x cp ranks reduce the gradients); "
                          + ("DeepSpeed's engine averages over its own groups" if p.strategy.startswith("deepspeed")
                             else "torch-tp has no data-parallel axis: use fsdp2 --parallel.tp N"))
    if p.sequence_parallel:
        raise ConfigError(f"{flag} with --parallel.sequence_parallel: both split the sequence (Megatron's sequence "
                          "parallelism inside the tp group); drop --parallel.sequence_parallel")
    if getattr(cfg.model, "dropout", 0.0) > 0:
        raise ConfigError(f"{flag}: ring and Ulysses attention have no attention dropout: use --model.dropout 0")
    if t.compile:
        raise ConfigError(f"{flag} with --trainer.compile: the ring's point-to-point exchanges inside autograd "
                          "functions are not written for tracing; drop one")
    seq = t.seq_len or cfg.model.block_size
    if seq < 2 * p.cp:
        raise ConfigError(f"{flag}: the sequence is cut into 2·cp = {2 * p.cp} chunks, two per rank, so "
                          f"--trainer.seq_len must be >= {2 * p.cp}, got {seq}")
    from ltk.parallel.cost_cp import check_cp as check_heads

    heads, kv_heads = heads_of(cfg)
    try:
        check_heads(p.cp, p.cp_impl, heads, kv_heads, p.tp)
    except ValueError as e:
        raise ConfigError(f"{flag} --parallel.cp_impl {p.cp_impl}: {e}") from None
