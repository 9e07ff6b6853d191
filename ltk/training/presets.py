"""Named run presets: plain functions returning a fresh RunConfig.

`gpt-debug` trains on a CPU in seconds to minutes on the embedded corpus. The GPT-2 sizes
use the released shapes (Radford et al. 2019, table 2) and the learning rates of the
GPT-3 paper's table 2.1 for models of those sizes (Brown et al. 2020); their batch is set
for one GPU — raise `--trainer.grad_accum` (or the number of GPUs) to reach GPT-2's
0.5M tokens per step.
"""
from __future__ import annotations

from typing import Callable

from ltk.models.bert import bert_config
from ltk.models.gpt import gpt_config
from ltk.models.llama import llama_config
from ltk.models.t5 import t5_config
from ltk.training.config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainerConfig, did_you_mean


def gpt_debug() -> RunConfig:
    # 4 layers x 128 wide, 128 positions, a 2048-token BPE: 1,071,872 parameters.
    return RunConfig(
        name="gpt-debug",
        model=gpt_config("gpt-debug"),
        data=DataConfig(vocab_size=2048),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1, min_lr_ratio=0.1),
        trainer=TrainerConfig(max_steps=600, batch_size=16, eval_every=100, eval_batches=16,
                              log_every=10, out_dir="runs/gpt-debug"),
    )


def _debug(family: str, model, lr: float, seq_len: int = 0) -> RunConfig:
    """A family's debug model on the embedded corpus, with gpt-debug's trainer settings."""
    cfg = gpt_debug()
    cfg.name, cfg.family, cfg.model = f"{family}-debug", family, model
    cfg.optim.lr = lr
    cfg.trainer.seq_len = seq_len
    cfg.trainer.out_dir = f"runs/{family}-debug"
    return cfg


def llama_debug() -> RunConfig:
    # 4 layers x 128 wide, 4 query heads sharing 2 key/value heads (GQA), RoPE, SwiGLU
    return _debug("llama", llama_config("llama-debug"), 3e-3)


def bert_debug() -> RunConfig:
    # 2 post-LayerNorm layers x 128 wide, masked-LM objective (15% of tokens)
    return _debug("bert", bert_config("bert-debug"), 1e-3)


def t5_debug() -> RunConfig:
    # 2 + 2 layers x 64 wide, span corruption; T5 has no position table, so the window is set here
    return _debug("t5", t5_config("t5-debug"), 3e-3, seq_len=128)


def _gpt2(name: str, lr: float) -> Callable[[], RunConfig]:
    def preset() -> RunConfig:
        return RunConfig(
            name=name,
            model=gpt_config(name),
            data=DataConfig(vocab_size=50257),
            optim=OptimConfig(lr=lr, warmup_steps=700, weight_decay=0.1, min_lr_ratio=0.1),
            trainer=TrainerConfig(max_steps=5000, batch_size=8, eval_every=250, eval_batches=8,
                                  log_every=10, ckpt_every=1000, out_dir=f"runs/{name}"),
        )

    preset.__name__ = name.replace("-", "_").replace(".", "_")
    preset.__doc__ = f"{name}: GPT-2 shape, peak lr {lr:g}."
    return preset


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "gpt-debug": gpt_debug,
    "llama-debug": llama_debug,
    "bert-debug": bert_debug,
    "t5-debug": t5_debug,
    "gpt2-124m": _gpt2("gpt2-124m", 6e-4),
    "gpt2-350m": _gpt2("gpt2-350m", 3e-4),
    "gpt2-774m": _gpt2("gpt2-774m", 2.5e-4),
    "gpt2-1.5b": _gpt2("gpt2-1.5b", 2e-4),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS) or ';'} available presets: "
                          + ", ".join(PRESETS))
    return PRESETS[name]()
