"""What `ltk plan` says a step sends is what `ltk train` sends: the Trainer on 2 and 4 gloo
processes, two steps of two micro-batches each, with the collectives of every step counted where
torch.distributed is called (ltk/parallel/comm_meter.py) and written to summary.json beside the
plan of the run's own flags — equal byte for byte, by collective, for DDP, ZeRO-1 and ZeRO-3, FSDP2
(resharding after forward or not), ZeRO-1 reducing bf16 gradients in fp32, tensor + sequence
parallelism, ring and Ulysses context parallelism, torch's pipeline over FSDP2 stages (its
tied-head all-reduce and its sends), and FSDP2 x DTensor TP for the data-parallel collectives the
meter sees. (`ltk bench parallel-comm` runs the rest: ZeRO-2, our pipeline, DDP x TP, torch-tp.)

Two findings of this meter are pinned here: FSDP2 gathers its root once a micro-batch and
reduce-scatters once a step (the plan used to count ZeRO-3's 2·m·Ψ and m·Ψ; under torch's pipeline
schedules a block is gathered m + 1 times a step), and a tensor-parallel
model built on the meta device lost the hooks that sum its replicated gradients under sequence
parallelism (the run now equals one process)."""
from __future__ import annotations

import json

import pytest
from engine_runs import by_step, same_weights, train_jobs

from ltk.models.gpt import GPTConfig
from ltk.models.llama import LlamaConfig
from ltk.parallel.dist import spawn
from ltk.training.checkpoint import load_checkpoint
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig

TIMEOUT = 300
STEPS, ACCUM, BATCH, T = 2, 2, 4, 32
# name -> (world, family, parallel settings, trainer dtype)
RUNS = {
    "ddp": (2, "gpt", dict(strategy="ddp"), "fp32"),
    "zero1": (2, "gpt", dict(strategy="zero1"), "fp32"),
    "zero3": (2, "gpt", dict(strategy="zero3"), "fp32"),
    "fsdp2": (2, "gpt", dict(strategy="fsdp2"), "fp32"),
    "fsdp2-keep": (2, "gpt", dict(strategy="fsdp2", reshard_after_forward=False), "fp32"),
    "zero1-bf16-fp32-reduce": (2, "gpt", dict(strategy="zero1", reduce_dtype="fp32"), "bf16"),
    "zero3-llama-bf16": (2, "llama", dict(strategy="zero3"), "bf16"),
    "tp2-sp": (2, "gpt", dict(tp=2, sequence_parallel=True), "fp32"),
    "cp2-ring": (2, "llama", dict(strategy="ddp", cp=2), "fp32"),
    "cp2-ulysses": (2, "llama", dict(strategy="zero2", cp=2, cp_impl="ulysses"), "fp32"),
    "cp2-auto": (2, "llama", dict(cp=2), "fp32"),  # torch DDP reduces out of sight: only the ring's sends
    "fsdp2-tp2": (4, "gpt", dict(strategy="fsdp2", tp=2), "fp32"),
    "pp2-fsdp2-torch": (4, "gpt", dict(strategy="fsdp2", pp=2, pp_engine="torch"), "fp32"),
    "pp2-fsdp2-torch-keep": (4, "gpt", dict(strategy="fsdp2", pp=2, pp_engine="torch", reshard_after_forward=False),
                             "fp32"),
}
SP_STEPS = 4  # the tp2-sp run and its one-process reference train longer: the weights must stay equal


def _config(corpus, out, family: str, steps: int = STEPS, dtype: str = "fp32", **parallel) -> RunConfig:
    if family == "llama":
        model = LlamaConfig(vocab_size=0, block_size=T, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                            intermediate_size=64, rope_theta=10000.0, backend="torch")
    else:  # biases on: the row-parallel biases and LayerNorm biases are replicated under sequence parallelism
        model = GPTConfig(vocab_size=0, block_size=T, n_layer=2, n_head=4, n_embd=32, dropout=0.0, backend="torch")
    cfg = RunConfig(name="comm", family=family, model=model,
                    data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
                    optim=OptimConfig(lr=3e-3, warmup_steps=1, decay_steps=steps),
                    trainer=TrainerConfig(max_steps=steps, batch_size=BATCH, grad_accum=ACCUM, eval_every=steps,
                                          eval_batches=2, log_every=1, out_dir=str(out), progress=False, seed=3,
                                          ckpt_every=0, dtype=dtype, timeline=False))
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("comm_plan")
    cfgs = {n: _config(tiny_corpus, root / n, fam, SP_STEPS if n == "tp2-sp" else STEPS, dtype, **kw)
            for n, (_, fam, kw, dtype) in RUNS.items()}
    spawn(train_jobs, 1, [(_config(tiny_corpus, root / "one", "gpt", SP_STEPS), None)], timeout_s=TIMEOUT)
    for world in (2, 4):
        spawn(train_jobs, world, [(cfgs[n], None) for n, (w, *_) in RUNS.items() if w == world], timeout_s=TIMEOUT)
    return root


def _comm(root, name) -> dict:
    return json.loads((root / name / "summary.json").read_text())["comm_per_step"]


@pytest.mark.parametrize("name", list(RUNS))
def test_every_step_sends_the_plans_bytes(runs, name):
    c = _comm(runs, name)
    assert c["steps"] == (SP_STEPS if name == "tp2-sp" else STEPS) and c["steps_equal"]
    assert c["total_per_step"] > 0
    for op, row in c["by_collective"].items():
        if not row.get("partly_counted"):
            assert row["measured"] == row["plan"], (name, op, row)
    assert c["equal"]


def test_fsdp2_gathers_its_root_once_and_reduces_once_a_step(runs):
    """ZeRO-3 all-gathers every unit twice a micro-batch and reduce-scatters every micro-batch;
    FSDP2 keeps the root (wte, wpe, ln_f: 300·32 + 32·32 + 2·32 parameters) from forward to
    backward and accumulates without sync. Without resharding a block is gathered once."""
    zero3, fsdp2, keep = (_comm(runs, n)["per_step"] for n in ("zero3", "fsdp2", "fsdp2-keep"))
    root = 4 * (300 * 32 + T * 32 + 2 * 32)
    assert zero3["all_gather"] - fsdp2["all_gather"] == ACCUM * root
    assert fsdp2["reduce_scatter"] * ACCUM == zero3["reduce_scatter"]
    assert keep["all_gather"] == zero3["all_gather"] // 2 and keep["reduce_scatter"] == fsdp2["reduce_scatter"]
    # under torch's pipeline: a block m + 1 times a step, or once without resharding (the root once either way)
    pp, pp_keep = (_comm(runs, n)["per_step"] for n in ("pp2-fsdp2-torch", "pp2-fsdp2-torch-keep"))
    assert pp_keep["all_gather"] == pp_keep["reduce_scatter"] < pp["all_gather"]  # one gather of the stage = Ψ_stage


def test_fp32_reduction_doubles_the_bf16_gradient_bytes(runs):
    c = _comm(runs, "zero1-bf16-fp32-reduce")["per_step"]
    assert c["reduce_scatter"] == 2 * c["all_gather"]  # fp32 gradients, bf16 parameters gathered


def test_what_the_meter_cannot_see_is_named_not_zero(runs):
    """DTensor TP's functional collectives and torch DDP's C++ reducer pass by Python: their
    groups are listed as not counted and their collectives left out of "equal"."""
    c = _comm(runs, "fsdp2-tp2")
    assert c["not_counted"] == ["tensor_parallel"] and c["by_collective"]["all_reduce"]["partly_counted"]
    auto = _comm(runs, "cp2-auto")
    assert auto["not_counted"] == ["data_parallel"] and auto["by_collective"]["all_reduce"]["partly_counted"]
    assert auto["per_step"]["send"] == _comm(runs, "cp2-ring")["per_step"]["send"] > 0


def test_sequence_parallel_on_meta_equals_one_process(runs):
    """The replicated LayerNorm gains and biases see a sequence shard each: their gradients must be
    summed over the tp group, or each rank steps alone on a partial sum and drifts from one
    process. Every weight is compared but the attention's in-projection bias: its key third has an
    exactly zero gradient, which Adam turns from rounding noise into ±lr steps (see
    tests/distributed/test_parallel_trainer.py)."""
    a, b = by_step(runs / "one"), by_step(runs / "tp2-sp")
    assert sorted(a) == sorted(b)
    for step, row in a.items():
        assert b[step]["loss"] == pytest.approx(row["loss"], rel=1e-5, abs=1e-5), step
    assert b[SP_STEPS]["val_loss"] == pytest.approx(a[SP_STEPS]["val_loss"], rel=1e-5, abs=1e-5)
    wa, wb = (load_checkpoint(runs / n).model for n in ("one", "tp2-sp"))
    keep = [k for k in wb if not k.endswith("c_attn.bias")]
    assert any("ln_1" in k for k in keep)
    same_weights({k: v for k, v in wa.items() if not k.endswith("c_attn.bias")}, {k: wb[k] for k in keep}, 1e-5)
