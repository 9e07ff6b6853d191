"""pytest-benchmark suite of the train step: our GPT and transformers' GPT-2, tiny config.

Kept apart from tests/ (which checks correctness): this times, for regression tracking.

    pytest ltk/bench/                                    # a table of both providers
    pytest ltk/bench/ --benchmark-json=train_step.json   # save, then compare runs with
    pytest-benchmark compare                         # (or --benchmark-compare)

The step is the one ltk/bench/train_step.py times (same models, weight copy, data, AdamW); on
CUDA it synchronizes at the end of each call, since pytest-benchmark reads a wall clock.
"""
from __future__ import annotations

import pytest
import torch

from ltk.bench.harness import resolve_device
from ltk.bench.train_step import build, check_same_loss, make_batches, make_optimizer, make_step
from ltk.models.gpt import GPTConfig

TINY = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)
BATCH = 4


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("transformers", reason="the baseline needs the `dev` or `baselines` extra")
    device = resolve_device("auto")
    models = build(TINY, device)
    batches = make_batches(TINY.vocab_size, BATCH, TINY.block_size, device=device)
    check_same_loss(models["ours"], models["transformers"], *batches[0])
    return device, models, batches


@pytest.mark.parametrize("provider", ["ours", "transformers"])
def test_train_step(benchmark, setup, provider):
    device, models, batches = setup
    amp = torch.bfloat16 if device.type == "cuda" else None
    step = make_step(models[provider], make_optimizer(models[provider], device), batches, amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed() -> None:
        step()
        sync()

    benchmark.group = "train-step"
    benchmark.extra_info.update(tokens_per_step=BATCH * TINY.block_size, device=str(device))
    benchmark.pedantic(timed, warmup_rounds=3, rounds=30, iterations=1)
