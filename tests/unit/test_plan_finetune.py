"""The fine-tuning plan (ltk/parallel/plan_finetune.py) equals what a run holds: for a tiny GPT and
Llama under LoRA and QLoRA (and full fine-tuning), every component of ltk/models/qlora.py
`memory_breakdown` after the first AdamW step, byte for byte, on one process, on each of 2 ddp
ranks (replicated), and on each of 2 zero3 and fsdp2 ranks (sharded: odd shapes, so that chunks
are uneven, tensors unaligned and the ranks' splits differ; fp32 and bf16); and the collectives
carry the plan's bytes: ddp's all-reduce (the adapters' gradients), zero3's all-gathers and
reduce-scatters (our engine's counters, ltk/parallel/dist.py STATS), fsdp2's (torch's collectives,
counted where FSDP2 calls them)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from ltk.models.gpt import GPTConfig
from ltk.models.llama import LlamaConfig
from ltk.parallel.plan_finetune import COMPONENTS, plan_finetune

CONFIGS = {"gpt": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, backend="torch"),
           "llama": LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                intermediate_size=48, backend="torch"),
           # odd sizes: FSDP2's last chunks padded, zero3's frozen tensors 16-byte aligned, splits per rank
           "gpt-odd": GPTConfig(vocab_size=65, block_size=17, n_layer=2, n_head=2, n_embd=34, backend="torch"),
           "llama-odd": LlamaConfig(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=36,
                                    intermediate_size=45, backend="torch")}
BATCH, SEQ = 4, 16
# (config, method, targets, strategy, dtype, r) measured on 2 ranks in one spawn
TWO_RANKS = [("gpt", "lora", "", "ddp", "fp32", 4), ("llama", "qlora", "", "ddp", "fp32", 4),
             ("gpt", "lora", "", "ddp", "bf16", 4),  # MasterOptimizer: its fp32 masters are optimizer state
             ("gpt-odd", "lora", "", "zero3", "fp32", 3), ("gpt-odd", "qlora", "", "zero3", "fp32", 3),
             ("llama-odd", "qlora", "", "zero3", "bf16", 3), ("gpt-odd", "qlora", "", "fsdp2", "fp32", 3),
             ("gpt-odd", "lora", "c_attn,c_fc", "fsdp2", "bf16", 3), ("llama-odd", "qlora", "", "fsdp2", "fp32", 3)]


@contextlib.contextmanager
def torch_collectives():
    """Payload bytes of the collectives FSDP2 issues (torch 2.13: all_gather_single and
    reduce_scatter_single, the gathered output and the reduced input, as STATS counts ours)."""
    import torch.distributed as dist

    counted: dict[str, int] = {}
    saved = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single")}

    def counting(name, fn):
        def call(output, input, *args, **kwargs):
            t = output if name == "all_gather_single" else input
            op = name.removesuffix("_single")
            counted[op] = counted.get(op, 0) + t.numel() * t.element_size()
            return fn(output, input, *args, **kwargs)
        return call

    for name, fn in saved.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counted
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _measure_all(rank: int, world: int, settings: list) -> list[dict]:
    """_measure for each setting, in one process (one start of the ranks)."""
    return [_measure(rank, world, *s) for s in settings]


def _measure(rank: int, world: int, family: str, method: str, targets: str, strategy: str = "ddp",
             dtype: str = "fp32", r: int = 4) -> dict:
    """One training step as the Trainer runs it (adapter, engine, AdamW, autocast under bf16), then
    the memory by component and the collectives' payload bytes of the step."""
    from ltk.models import get_family
    from ltk.models.qlora import memory_breakdown
    from ltk.parallel.dist import STATS
    from ltk.parallel.strategy import ParallelRun
    from ltk.training.adapters import apply_adapter
    from ltk.training.config import AdapterConfig, OptimConfig
    from ltk.training.optim import build_optimizer

    torch.manual_seed(0)
    model = get_family(family.split("-")[0]).model_cls(CONFIGS[family])
    model = apply_adapter(model, family.split("-")[0], AdapterConfig(method="none" if method == "full" else method,
                                                                     r=r, targets=targets))
    run = ParallelRun(model, lambda m: m.param_groups(0.0), lambda g: build_optimizer(g, OptimConfig(), "cpu"),
                      strategy="none" if world == 1 else strategy, batch_size=BATCH, compute_dtype=dtype)
    x = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    STATS.reset()
    with torch_collectives() as torch_comm:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = run.engine(run.rows(x), targets=run.rows(x))
        loss.backward()
        run.engine.step()
    return {**memory_breakdown(model, run.optimizer, run.engine),
            "comm": torch_comm if strategy == "fsdp2" else dict(STATS.payload)}


def _plan(family: str, method: str, world: int, targets: str, strategy: str = "ddp", dtype: str = "fp32",
          r: int = 4, rank: int = 0) -> dict:
    return plan_finetune(family.split("-")[0], CONFIGS[family], method=method, world=world,
                         strategy="none" if world == 1 else strategy, batch=BATCH, seq_len=SEQ, r=r,
                         targets=targets, dtype=dtype, rank=rank)


@pytest.mark.parametrize("family,method,targets", [("gpt", "lora", ""), ("gpt", "qlora", "c_attn,c_fc"),
                                                   ("llama", "lora", "wq,wv"), ("llama", "qlora", ""),
                                                   ("gpt", "full", "")])
def test_one_process_plan_equals_measured_bytes(family, method, targets):
    measured, plan = _measure(0, 1, family, method, targets), _plan(family, method, 1, targets)
    assert {k: measured[k] for k in COMPONENTS} == plan["components"]
    assert plan["trainable_params"] == measured["trainable"] // 4  # fp32 adapters (or every weight)
    assert plan["comm_bytes_per_step"] == 0


@pytest.fixture(scope="module")
def two_ranks():
    from ltk.parallel.dist import spawn

    return spawn(_measure_all, 2, TWO_RANKS, timeout_s=240)


def test_ddp_two_ranks_replicate_and_all_reduce_the_adapter_gradients_only(two_ranks):
    for i, (family, method, targets, strategy, dtype, r) in enumerate(TWO_RANKS):
        if strategy != "ddp":
            continue
        plan, one = (_plan(family, method, n, targets, dtype=dtype, r=r) for n in (2, 1))
        assert plan["components"] == one["components"]  # ddp replicates every component
        for m in (ranks[i] for ranks in two_ranks):
            assert {k: m[k] for k in COMPONENTS} == plan["components"]
            # the frozen base never travels: one all-reduce of the adapters' gradients, t·ψ bytes
            assert m["comm"] == plan["comm"]["data_parallel"] == {"all_reduce": plan["components"]["gradients"]}


@pytest.mark.parametrize("i", [i for i, s in enumerate(TWO_RANKS) if s[3] != "ddp"],
                         ids=lambda i: "-".join(x for x in map(str, TWO_RANKS[i]) if x))
def test_sharded_ranks_hold_and_send_what_the_plan_says(two_ranks, i):
    """zero3 / fsdp2 on 2 ranks: each rank's frozen base, adapters, gradients and optimizer states
    equal the plan of that rank byte for byte, and the step's all-gathers and reduce-scatters its
    bytes; the frozen base is about halved."""
    family, method, targets, strategy, dtype, r = TWO_RANKS[i]
    plans = [_plan(family, method, 2, targets, strategy, dtype, r, rank) for rank in (0, 1)]
    one = _plan(family, method, 1, targets, dtype=dtype, r=r)["components"]
    for rank, (plan, ranks) in enumerate(zip(plans, two_ranks)):
        m = ranks[i]
        assert {k: m[k] for k in COMPONENTS} == plan["components"], rank
        assert m["comm"] == plan["comm"]["data_parallel"], rank
        frozen, whole = sum(m[k] for k in COMPONENTS[:3]), sum(one[k] for k in COMPONENTS[:3])
        if strategy == "zero3" and dtype == "bf16":  # zero3 casts the frozen floats to bf16: ~a quarter
            whole = sum(one[k] for k in COMPONENTS[:2]) + one["base_full"] / 2
        assert whole / 2 <= frozen <= 0.56 * whole, (rank, frozen, whole)
    if strategy == "fsdp2":  # A's 3 rows over 2 ranks: 2 and 1, so rank 1 keeps smaller moments
        assert plans[1]["components"]["optimizer_states"] < plans[0]["components"]["optimizer_states"]
    elif method == "qlora":  # the same bytes on each rank, a different share of codes and statistics
        assert sum(plans[0]["components"].values()) == sum(plans[1]["components"].values())
        assert plans[0]["components"] != plans[1]["components"]


def test_sharded_plans_split_the_frozen_base_and_gather_units():
    """zero3 / fsdp2 on 4 ranks (sizes that divide): adapters, gradients and moments are 1/4, the
    frozen base 1/4 plus zero3's 16-byte alignment (fsdp2: plus QLoRA's replicated fp32 statistics),
    the units gathered on top; zero3 all-gathers every unit twice a micro-batch, fsdp2 the root once;
    only the adapters' gradients are reduce-scattered; for full fine-tuning the gathered bytes are the
    pre-training plan's (ltk/parallel/plan.py), and so is zero3's traffic."""
    from ltk.parallel.finetune_layout import gathered_unit_bytes, layout
    from ltk.parallel.plan import plan

    cfg, n = CONFIGS["llama"], 4
    one = _plan("llama", "qlora", 1, "")["components"]
    units = layout("llama", cfg, "qlora", 4, "", "fp32")[0]
    frozen_one = sum(one[k] for k in COMPONENTS[:3])
    replicated = sum(t.numel * t.elem for u in units for t in u.frozen if t.nf4_buffer and t.floating)
    for strategy in ("zero3", "fsdp2"):
        ps = [plan_finetune("llama", cfg, method="qlora", world=n, strategy=strategy, batch=BATCH, seq_len=SEQ,
                            r=4, rank=rank) for rank in range(n)]
        c = ps[0]["components"]
        assert c["trainable"] == c["gradients"] == one["gradients"] / n
        # two moments a trainable element; a 4-byte step per tensor stepped: fsdp2 per parameter (A and B
        # of 14 Linears), our zero3 per unit and group (2 blocks, the adapters all decay matrices)
        assert c["optimizer_states"] == 2 * c["gradients"] + 4 * (28 if strategy == "fsdp2" else 2)
        frozen = [sum(p["components"][k] for k in COMPONENTS[:3]) for p in ps]
        if strategy == "zero3":  # every rank the same bytes: the unit's aligned vector / 4
            aligned = sum(-(-t.numel * t.elem // 16) * 16 for u in units for t in u.frozen)
            assert frozen == [sum(-(-sum(-(-t.numel * t.elem // 16) * 16 for t in u.frozen) // n) for u in units)] * n
            assert frozen_one / n < frozen[0] <= aligned / n + len(units)
        else:  # each tensor a quarter, the fp32 statistics whole on every rank
            assert frozen == [(frozen_one - replicated) / n + replicated] * n
        comm = ps[0]["comm"]["data_parallel"]
        weights = sum(sum(p["components"][k] for k in COMPONENTS[:4]) - (replicated if strategy == "fsdp2" else 0)
                      for p in ps)  # what the all-gathers of all units move, once
        root = gathered_unit_bytes(units[0], strategy, n, "fp32")
        assert comm["all_gather"] == (2 * weights if strategy == "zero3" else 2 * weights - root)
        assert comm["reduce_scatter"] == one["gradients"]
        assert ps[0]["gathered"] > 0
        full = plan_finetune("llama", cfg, method="full", world=n, strategy=strategy, batch=BATCH, seq_len=SEQ)
        ref = plan("llama", cfg, world=n, strategy=strategy, batch=BATCH, seq_len=SEQ, dtype="fp32")
        assert full["gathered"] == ref["gathered"]
        assert full["comm"]["data_parallel"] == ref["comm"]["data_parallel"]  # the root gathered once under fsdp2


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
