"""The fine-tuning plan (ltk/parallel/plan_finetune.py) equals what a run holds: for a tiny GPT and
Llama under LoRA and QLoRA (and full fine-tuning), every component of ltk/models/qlora.py
`memory_breakdown` after the first AdamW step, byte for byte, on one process and on each of 2 ddp
ranks (replicated), and the all-reduce carries exactly the adapters' gradients."""
from __future__ import annotations

import pytest
import torch

from ltk.models.gpt import GPTConfig
from ltk.models.llama import LlamaConfig
from ltk.parallel.plan_finetune import COMPONENTS, plan_finetune

CONFIGS = {"gpt": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, backend="torch"),
           "llama": LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                intermediate_size=48, backend="torch")}
BATCH, SEQ = 4, 16


def _measure_all(rank: int, world: int, settings: list) -> list[dict]:
    """_measure for each (family, method, targets), in one process (one start of the ranks)."""
    return [_measure(rank, world, *s) for s in settings]


def _measure(rank: int, world: int, family: str, method: str, targets: str) -> dict:
    """One training step as the Trainer runs it (adapter, engine, AdamW), then the memory by component
    and the collectives' payload bytes of the step."""
    from ltk.models import get_family
    from ltk.models.qlora import memory_breakdown
    from ltk.parallel.dist import STATS
    from ltk.parallel.strategy import ParallelRun
    from ltk.training.adapters import apply_adapter
    from ltk.training.config import AdapterConfig, OptimConfig
    from ltk.training.optim import build_optimizer

    torch.manual_seed(0)
    model = get_family(family).model_cls(CONFIGS[family])
    model = apply_adapter(model, family, AdapterConfig(method="none" if method == "full" else method, r=4,
                                                       targets=targets))
    run = ParallelRun(model, lambda m: m.param_groups(0.0), lambda g: build_optimizer(g, OptimConfig(), "cpu"),
                      strategy="none" if world == 1 else "ddp", batch_size=BATCH)
    x = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    STATS.reset()
    run.engine(run.rows(x), targets=run.rows(x)).backward()
    run.engine.step()
    return {**memory_breakdown(model, run.optimizer), "comm": dict(STATS.payload)}


def _plan(family: str, method: str, world: int, targets: str) -> dict:
    return plan_finetune(family, CONFIGS[family], method=method, world=world, strategy="none" if world == 1 else "ddp",
                         batch=BATCH, seq_len=SEQ, r=4, targets=targets)


@pytest.mark.parametrize("family,method,targets", [("gpt", "lora", ""), ("gpt", "qlora", "c_attn,c_fc"),
                                                   ("llama", "lora", "wq,wv"), ("llama", "qlora", ""),
                                                   ("gpt", "full", "")])
def test_one_process_plan_equals_measured_bytes(family, method, targets):
    measured, plan = _measure(0, 1, family, method, targets), _plan(family, method, 1, targets)
    assert {k: measured[k] for k in COMPONENTS} == plan["components"]
    assert plan["trainable_params"] == measured["trainable"] // 4  # fp32 adapters (or every weight)
    assert plan["comm_bytes_per_step"] == 0


def test_ddp_two_ranks_replicate_and_all_reduce_the_adapter_gradients_only():
    from ltk.parallel.dist import spawn

    settings = [("gpt", "lora", ""), ("llama", "qlora", "")]
    results = spawn(_measure_all, 2, settings, timeout_s=180)
    for i, (family, method, _) in enumerate(settings):
        ranks = [r[i] for r in results]
        plan, one = _plan(family, method, 2, ""), _plan(family, method, 1, "")
        assert plan["components"] == one["components"]  # ddp replicates every component
        for m in ranks:
            assert {k: m[k] for k in COMPONENTS} == plan["components"]
            # the frozen base never travels: one all-reduce of the adapters' gradients, t·ψ bytes
            assert m["comm"] == plan["comm"]["data_parallel"] == {"all_reduce": plan["components"]["gradients"]}


def test_sharded_plans_split_the_frozen_base_and_gather_units():
    """zero3 / fsdp2: every component ≈ 1/N (padded up per unit), the gathered units on top, the
    frozen base all-gathered twice a step, only the adapters' gradients reduce-scattered; for full
    fine-tuning the gathered bytes are the pre-training plan's (ltk/parallel/plan.py)."""
    from ltk.parallel.plan import plan

    cfg = CONFIGS["llama"]
    one = _plan("llama", "qlora", 1, "")
    for strategy in ("zero3", "fsdp2"):
        p = plan_finetune("llama", cfg, method="qlora", world=4, strategy=strategy, batch=BATCH, seq_len=SEQ, r=4)
        c = p["components"]
        for k in COMPONENTS[:5]:
            assert one["components"][k] / 4 <= c[k] <= one["components"][k] / 4 + 3, k  # 3 units, ⌈x/4⌉ each
        # two moments a trainable element; a 4-byte step per tensor stepped: fsdp2 per parameter (A and B
        # of 14 Linears), our zero3 per unit and group (2 blocks, the adapters all decay matrices)
        assert c["optimizer_states"] == 2 * c["gradients"] + 4 * (28 if strategy == "fsdp2" else 2)
        weights = sum(one["components"][k] for k in COMPONENTS[:4])
        assert p["comm"]["data_parallel"]["all_gather"] == pytest.approx(2 * weights, abs=64)
        assert p["comm"]["data_parallel"]["reduce_scatter"] == one["components"]["gradients"]
        assert p["gathered"] > 0
        full = plan_finetune("llama", cfg, method="full", world=4, strategy=strategy, batch=BATCH, seq_len=SEQ)
        ref = plan("llama", cfg, world=4, strategy=strategy, batch=BATCH, seq_len=SEQ, dtype="fp32")
        assert full["gathered"] == ref["gathered"]
        assert full["comm"]["data_parallel"] == ref["comm"]["data_parallel"]


def test_plan_refuses_what_no_run_has():
    with pytest.raises(ValueError, match="matched no"):
        _plan("gpt", "lora", 1, "nope")
    with pytest.raises(ValueError, match="--method"):
        _plan("gpt", "dora", 1, "")
    with pytest.raises(ValueError, match="covers --strategy"):
        plan_finetune("gpt", CONFIGS["gpt"], method="lora", world=2, strategy="zero1")


def test_ltk_plan_method_prints_the_components(capsys):
    import json

    from ltk.cli import main

    argv = ["plan", "--preset", "gpt-debug", "--world", "2", "--dtype", "fp32", "--method", "qlora", "--lora-r", "4",
            "--targets", "c_attn", "--json"]
    assert main(argv) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["method"] == "qlora" and p["adapted_layers"] == 4 and p["components"]["base_nf4_packed"] > 0
    assert p["comm"]["data_parallel"] == {"all_reduce": p["components"]["gradients"]}
    assert main(argv[:-1]) == 0
    assert "QLoRA r=4 on 4 Linears" in capsys.readouterr().out
    assert main([*argv, "--tp", "2"]) == 2  # the fine-tuning plan is data parallel only: a one-line error
