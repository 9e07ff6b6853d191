"""train-step's Hugging Face providers (transformers+ours, transformers+liger) and the CPU peak-memory
counter they are compared by (ltk/bench/live_bytes.py); tiny shapes."""
import json

import pytest
import torch

from ltk.bench import run_benchmark
from ltk.bench.live_bytes import LiveBytes, step_peak_mb


def test_live_bytes_counts_what_is_alive_at_once_and_skips_in_place_writes():
    x0 = torch.zeros(256, 256)  # 256 KiB that exist before: never counted
    with LiveBytes() as lb:
        x = torch.randn(512, 512)  # 1 MiB
        y = x @ x  # 1 MiB
        del x
        z = y + 1  # 1 MiB, while x is gone: the peak stays at 2 MiB
        z.add_(1)
        x0.mul_(2)  # in place into a tensor made before: no new memory
    assert lb.peak == 2 * 2**20 and lb.live == 2 * 2**20
    del y, z
    assert lb.live == 0

    lin = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters())
    inp = torch.randn(8, 64)

    def step():
        lin(inp).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    state = (64 * 64 + 64) * 4 * 3  # weights + two moments, fp32
    peak = step_peak_mb(step, lin, opt) * 2**20
    assert state + (64 * 64 + 64) * 4 <= peak < state + 2**20  # at least the gradients on top of the state


def test_train_step_llama_hf_providers():
    pytest.importorskip("transformers")
    rows = run_benchmark("train-step", model="llama", providers="transformers,transformers+ours,transformers+liger",
                         batch_size=1, seq_len=8, min_time=0.05, rounds=1, device="cpu")
    assert [r.provider for r in rows] == ["transformers", "transformers+ours"]
    assert any(s.provider == "transformers+liger" and ("CUDA" in s.reason or "not installed" in s.reason)
               for s in rows.skipped)  # Liger absent (CI), or present and needing CUDA
    extra = [json.loads(r.extra) for r in rows]
    assert abs(extra[0]["first_step_loss"] - extra[1]["first_step_loss"]) < 1e-4
    assert "swiglu" in extra[1]["patched"]["mlp"] and extra[1]["patched"]["attention"].endswith("LlamaAttention)")
    assert all(r.peak_mem_mb > 0 and r.throughput > 0 for r in rows) and rows[0].speedup == 1.0
    with pytest.raises(ValueError, match="transformers\\+liger applies to llama"):
        run_benchmark("train-step", model="bert", providers="transformers,transformers+liger")
