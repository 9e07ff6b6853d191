"""`ltk plan` and ltk/parallel/plan.py: the cost model applied to a preset. The per-rank parameter
count is checked against the real splits (tensor parallel in a fake process group, pipeline
stages), the byte counts against the formulas of ltk/parallel/cost.py."""
import json
import math

import pytest

from ltk.cli import main
from ltk.models.gpt import GPT, GPTConfig, gpt_config, num_params
from ltk.parallel import cost
from ltk.parallel.dist import spawn
from ltk.parallel.plan import model_shape, params_per_rank, plan

CFG = dict(vocab_size=256, block_size=32, n_layer=4, n_head=4, n_embd=64)


def test_plan_json_has_the_documented_keys(capsys):
    assert main(["plan", "--preset", "gpt2-124m", "--world", "8", "--strategy", "zero3", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for k in ("params", "grads", "optimizer", "activations", "total", "comm_bytes_per_step"):
        assert isinstance(p[k], int) and p[k] > 0, k
    assert p["total"] == p["params"] + p["grads"] + p["optimizer"] + p["activations"] + p["gathered"]
    psi = 124_439_808
    assert p["params"] == p["grads"] == math.ceil(psi / 8) * 2 and p["optimizer"] == math.ceil(psi / 8) * 12


def test_zero_stages_follow_the_paper_and_zero3_moves_1_5x_ddp():
    cfg = GPTConfig(**CFG)
    psi = num_params(cfg)
    runs = {s: plan("gpt", cfg, world=4, strategy=s, batch=8, dtype="bf16") for s in ("ddp", "zero1", "zero2", "zero3")}
    assert runs["ddp"]["params"] + runs["ddp"]["grads"] + runs["ddp"]["optimizer"] == 16 * psi  # (2 + 2 + K)Ψ
    shard = math.ceil(psi / 4)
    assert runs["zero1"]["optimizer"] == 12 * shard and runs["zero1"]["grads"] == 2 * psi
    assert runs["zero2"]["grads"] == 2 * shard and runs["zero2"]["params"] == 2 * psi
    assert runs["zero3"]["params"] == 2 * shard
    assert runs["zero3"]["comm_wire_bytes_per_step"] == pytest.approx(1.5 * runs["ddp"]["comm_wire_bytes_per_step"])
    assert runs["zero1"]["comm_wire_bytes_per_step"] == pytest.approx(runs["ddp"]["comm_wire_bytes_per_step"])


def test_bad_plans_are_named():
    cfg = GPTConfig(**CFG)
    with pytest.raises(ValueError, match="not divisible"):
        plan("gpt", cfg, world=6, tp=4)
    with pytest.raises(ValueError, match="unknown strategy"):
        plan("gpt", cfg, world=2, strategy="zero4")
    with pytest.raises(ValueError, match="does not split"):
        plan("gpt", cfg, world=4, batch=6)


def _tp_local_params(rank, world, cfg):
    import torch

    from ltk.parallel.dist import Comm
    from ltk.parallel.tp_plan import apply_tensor_parallel

    torch.manual_seed(0)
    model = apply_tensor_parallel(GPT(GPTConfig(**cfg, backend="torch")), Comm())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tp", [2, 4])
def test_params_per_rank_equals_the_tensor_parallel_split(tp):
    """One rank of a tp-way split, built for real in a fake process group."""
    local = spawn(_tp_local_params, tp, CFG, fake_rank=0, timeout_s=120)[0]
    assert params_per_rank(model_shape("gpt", GPTConfig(**CFG)), tp, 1) == local


@pytest.mark.parametrize("pp", [2, 4])
def test_params_per_rank_equals_the_largest_pipeline_stage(pp):
    from ltk.parallel.pipeline import rank_stages

    model = GPT(GPTConfig(**CFG, backend="torch"))
    per_rank = [sum(p.numel() for c in rank_stages(model, r, pp) for p in c.parameters()) for r in range(pp)]
    assert params_per_rank(model_shape("gpt", GPTConfig(**CFG)), 1, pp) == max(per_rank)


def test_activations_follow_korthikanti():
    s, b, h, a = 2048, 1, 4096, 32
    assert cost.activation_bytes_per_layer(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert (cost.activation_bytes_per_layer(s, b, h, a, tp=8, sequence_parallel=True)
            == s * b * h * (34 + 5 * a * s / h) / 8)
    assert cost.activation_bytes_per_layer(s, b, h, a, flash=True) == s * b * h * 34
    assert cost.activation_bytes_per_layer(s, b, h, a, recompute=True) == 2 * s * b * h


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_adds_its_fp32_partition_copy_in_fp32_only(stage):
    """DeepSpeed shards what our stage shards, plus its optimizer's flat fp32 copy of the
    partition (4Ψ/N) when the model is fp32; under bf16 both hold that master already."""
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)
    for dtype, extra in (("fp32", 4), ("bf16", 0)):
        ours = plan("gpt", cfg, world=4, strategy=f"zero{stage}", dtype=dtype)
        ds = plan("gpt", cfg, world=4, strategy=f"deepspeed-zero{stage}", dtype=dtype)
        assert ds["optimizer"] - ours["optimizer"] == extra * math.ceil(ours["num_params_per_rank"] / 4)
        assert (ds["params"], ds["grads"], ds["comm_bytes_per_step"]) == \
            (ours["params"], ours["grads"], ours["comm_bytes_per_step"])


def test_reshard_after_forward_is_fsdp2s_and_halves_its_block_gathers():
    cfg = gpt_config("gpt2-124m")
    keep = plan("gpt", cfg, world=4, strategy="fsdp2", batch=8, micro_batches=2, reshard_after_forward=False)
    ref = plan("gpt", cfg, world=4, strategy="fsdp2", batch=8, micro_batches=2)
    root = 4 * (cfg.vocab_size * cfg.n_embd + cfg.block_size * cfg.n_embd + 2 * cfg.n_embd)
    blocks = 4 * keep["num_params_per_rank"] - root
    assert ref["comm"]["data_parallel"]["all_gather"] == 2 * (root + 2 * blocks)  # m = 2: root once, blocks twice
    assert keep["comm"]["data_parallel"]["all_gather"] == 2 * (root + blocks)
    assert keep["gathered"] > ref["gathered"]  # every block stays gathered to its backward
    with pytest.raises(ValueError, match="reshard-after-forward false is FSDP2's"):
        plan("gpt", cfg, world=4, strategy="zero3", batch=8, reshard_after_forward=False)


def test_fsdp2_under_a_pipeline_holds_its_stage_gathered():
    """PP x FSDP2: shards of the largest stage over dp, and the whole stage gathered with its
    whole gradients at the step's peak (torch's schedule syncs only after the last micro-batch)."""
    from ltk.parallel.plan import fsdp2_pp_gathered_bytes

    cfg = GPTConfig(**CFG)
    s = model_shape("gpt", cfg)
    p = plan("gpt", cfg, world=4, strategy="fsdp2", pp=2, batch=8, micro_batches=2, dtype="bf16")
    stage = params_per_rank(s, 1, 2)
    assert p["mesh"] == {"dp": 2, "tp": 1, "pp": 2} and p["num_params_per_rank"] == stage
    assert p["params"] == 2 * math.ceil(stage / 2) and p["optimizer"] == 12 * math.ceil(stage / 2)
    assert p["gathered"] == fsdp2_pp_gathered_bytes(s, 1, 2, cost.Precision.of("bf16")) == (2 + 2) * stage
    fp32_reduce = plan("gpt", cfg, world=4, strategy="fsdp2", pp=2, batch=8, micro_batches=2, dtype="bf16",
                       reduce_dtype="fp32")
    assert fp32_reduce["gathered"] == (2 + 4) * stage  # whole gradients accumulate in the reduce dtype
    with pytest.raises(ValueError, match="3-D mesh"):
        plan("gpt", cfg, world=8, strategy="fsdp2", tp=2, pp=2, micro_batches=2)
