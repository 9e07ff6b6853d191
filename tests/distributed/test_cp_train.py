"""`--parallel.cp` in the training loop (ltk/parallel/cp_train.py): the Trainer on 2 and 4 gloo
processes, each sequence split over a CP group, trains the same model as one process with the
same global batch — the same per-step losses within 1e-5 and the same validation loss (the 20-step
runs: the same gradient norms and final weights too) — for ring attention (zig-zag and
contiguous), Ulysses, GPT's learned positions with a length 2·cp does not divide (padding),
cp x dp (ddp, zero3, fsdp2) and cp x tp (ours, and fsdp2 x DTensor TP). The bytes
a step sends equal ltk/parallel/cost_cp.py's formula, with and without recomputation.

Starting a group costs seconds, so every run is planned up front and each world size starts
once: one process (the references, one per model), 2 and 4."""
from __future__ import annotations

import pytest
from engine_runs import by_step, same_run, train_jobs

from ltk.models.gpt import GPTConfig
from ltk.models.llama import LlamaConfig
from ltk.parallel import cost_cp
from ltk.parallel.context_parallel import CP_STATS, padded_length
from ltk.parallel.dist import Mesh, spawn
from ltk.training.config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainerConfig, apply_overrides
from ltk.training.config_check import check_run
from ltk.training.presets import get_preset
from ltk.training.trainer import Trainer

TIMEOUT = 300
STEPS, SHORT = 20, 10  # the main runs train 20 steps, the others the first 10 (lr does not depend on max_steps)
T_LLAMA, T_GPT = 64, 62  # 62: 2·cp = 4 does not divide it, and the padded 64 passes GPT's 62 positions
# name -> (world, model, steps, parallel settings)
RUNS = {
    "ring": (2, "llama", STEPS, dict(cp=2)),
    "ulysses": (2, "llama", SHORT, dict(cp=2, cp_impl="ulysses", strategy="ddp")),
    "contiguous": (2, "llama", SHORT, dict(cp=2, cp_layout="contiguous", strategy="zero2")),
    "gpt-padded": (2, "gpt", SHORT, dict(cp=2)),
    "cp2dp2-ddp": (4, "llama", STEPS, dict(cp=2, strategy="ddp")),
    "cp2dp2-zero3": (4, "llama", SHORT, dict(cp=2, strategy="zero3")),
    "cp2dp2-fsdp2": (4, "llama", SHORT, dict(cp=2, strategy="fsdp2")),
    "cp2tp2": (4, "llama", SHORT, dict(cp=2, tp=2, strategy="ddp")),
    "cp2tp2-fsdp2": (4, "llama", SHORT, dict(cp=2, tp=2, strategy="fsdp2")),
}


def _config(corpus, out, family="llama", steps=STEPS, **parallel) -> RunConfig:
    if family == "llama":
        model = LlamaConfig(vocab_size=0, block_size=T_LLAMA, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                            intermediate_size=64, rope_theta=10000.0, backend="torch")
    else:  # no biases: see tests/distributed/test_parallel_trainer.py
        model = GPTConfig(vocab_size=0, block_size=T_GPT, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False,
                          backend="torch")
    cfg = RunConfig(name="cp", family=family, model=model,
                    data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
                    optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=STEPS),
                    trainer=TrainerConfig(max_steps=steps, batch_size=4, eval_every=SHORT, eval_batches=2, log_every=1,
                                          out_dir=str(out), progress=False, seed=7, ckpt_every=0))
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def train_and_measure(rank, world, jobs, cfgs):
    """Worker: train the jobs (engine_runs.train_jobs), then CP_STATS of one training step of each
    of `cfgs` (built, one step to warm up, one counted)."""
    train_jobs(rank, world, jobs)
    out = []
    for cfg in cfgs:
        trainer = Trainer(cfg)
        trainer.train_step()
        CP_STATS.reset()
        trainer.train_step()
        out.append(CP_STATS.snapshot())
    return out


BYTES = {"ring": dict(cp=2), "ulysses": dict(cp=2, cp_impl="ulysses"), "ring-recompute": dict(cp=2)}


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_train")
    cfg = {n: _config(tiny_corpus, root / n, fam, steps, **kw) for n, (_, fam, steps, kw) in RUNS.items()}
    spawn(train_jobs, 1, [(_config(tiny_corpus, root / "llama"), None),
                          (_config(tiny_corpus, root / "gpt", "gpt"), None)], timeout_s=TIMEOUT)
    byte_cfgs = [_config(tiny_corpus, root / f"bytes-{n}", **kw) for n, kw in BYTES.items()]
    byte_cfgs[-1].trainer.activation_checkpointing = True
    stats = spawn(train_and_measure, 2, [(cfg[n], None) for n, (w, *_) in RUNS.items() if w == 2], byte_cfgs,
                  timeout_s=TIMEOUT)
    spawn(train_jobs, 4, [(cfg[n], None) for n, (w, *_) in RUNS.items() if w == 4], timeout_s=TIMEOUT)
    return {"bytes": dict(zip(BYTES, stats[0])), **{n: root / n for n in [*RUNS, "llama", "gpt"]}}


def _same_steps(single, run, tol=1e-5):
    """Every step `run` logged has `single`'s loss; the validation loss at its last step too."""
    a, b = by_step(single), by_step(run)
    for s, m in b.items():
        assert m["loss"] == pytest.approx(a[s]["loss"], rel=tol, abs=tol), s
        assert m["tokens"] == a[s]["tokens"]
    last = max(b)
    assert b[last]["val_loss"] == pytest.approx(a[last]["val_loss"], rel=tol, abs=tol)


def test_ring_cp2_equals_one_process_for_20_steps(runs):
    same_run(runs["llama"], runs["ring"], last=STEPS, grad_norm_tol=1e-4)


def test_ulysses_and_contiguous_split_equal_one_process(runs):
    _same_steps(runs["llama"], runs["ulysses"])
    _same_steps(runs["llama"], runs["contiguous"])


def test_gpt_learned_positions_with_padding(runs):
    """T = 62 is padded to 64 = 4 chunks of 16; the padded positions lie past GPT's 62-row table."""
    _same_steps(runs["gpt"], runs["gpt-padded"])


def test_cp_x_dp_equals_one_process(runs):
    """cp 2 x dp 2 on 4 ranks: gradients reduced over dp x cp (ddp: 20 steps and the final weights;
    ZeRO-3 and FSDP2 shard over the four)."""
    same_run(runs["llama"], runs["cp2dp2-ddp"], last=STEPS, grad_norm_tol=1e-4)
    _same_steps(runs["llama"], runs["cp2dp2-zero3"])
    _same_steps(runs["llama"], runs["cp2dp2-fsdp2"])


def test_cp_x_tp_equals_one_process(runs):
    """cp 2 x tp 2: the heads split by tp (ours; DTensor TP under FSDP2 over the cp ranks), each
    rank's ring over its local heads."""
    _same_steps(runs["llama"], runs["cp2tp2"])
    _same_steps(runs["llama"], runs["cp2tp2-fsdp2"])


@pytest.mark.parametrize("name", list(BYTES))
def test_bytes_per_step_equal_the_cost_model(runs, name):
    """One step (one micro-batch of B/dp = 4 rows): the bytes CP_STATS counted on rank 0 against
    cost_cp.comm_bytes for the run's shapes, 2 layers, fp32, forward + backward (+ the forward
    again under activation checkpointing). Ulysses' all-to-all sends (cp-1)/cp of its payload."""
    kw = BYTES[name]
    impl = kw.get("cp_impl", "ring")
    sent = runs["bytes"][name]["sent"]
    assert set(sent) == {f"{impl}.forward", f"{impl}.backward"}
    want = cost_cp.comm_bytes(padded_length(T_LLAMA, 2), 4, heads=4, kv_heads=2, head_dim=8, layers=2, cp=2,
                              impl=impl, dtype_bytes=4, dkv_bytes=4, recompute=name.endswith("recompute"))
    total = sum(want.values()) * (1 if impl == "ring" else 1 / 2)
    assert sum(sent.values()) == total


def test_cp_flags_and_refusals():
    """`ltk train --preset llama-debug --parallel.cp 2 --nproc 2` configures; what CP does not
    run is refused by name before any process starts."""
    cfg = apply_overrides(get_preset("llama-debug"), ["--parallel.cp", "2", "--parallel.cp_impl", "ulysses"])
    assert (cfg.parallel.cp, cfg.parallel.cp_impl, cfg.parallel.cp_layout) == (2, "ulysses", "zigzag")
    check_run(cfg, world=2, size=False, warn=False)

    def refused(match, world=2, preset="llama-debug", **parallel):
        c = get_preset(preset)
        for k, v in parallel.items():
            setattr(c.parallel, k, v)
        with pytest.raises(ConfigError, match=match):
            check_run(c, world=world, size=False, warn=False)

    refused("does not divide the 3 processes", world=3, cp=2)
    refused("bert", preset="bert-debug", cp=2)
    refused("Ulysses splits the attention heads", world=6, cp=3, cp_impl="ulysses")  # 4 heads
    refused("need --parallel.cp > 1", cp=1, cp_layout="contiguous")
    refused("pipeline", world=4, cp=2, pp=2)
    refused("torch-tp has no data-parallel axis", world=4, cp=2, tp=2, strategy="torch-tp")
    c = get_preset("llama-debug")
    c.parallel.cp, c.trainer.seq_len = 4, 6
    with pytest.raises(ConfigError, match="seq_len must be >= 8"):
        check_run(c, world=4, size=False, warn=False)


def test_mesh_groups_pp_dp_cp_tp():
    """rank = ((pp·dp + d)·cp + c)·tp + t: tp innermost, cp next; dp x cp flattened, dp major."""
    mesh = Mesh(dp=2, cp=2, tp=2)
    assert mesh.groups_along("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.groups_along("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh.groups_along("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.groups_along("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # without cp the layout and the order of the groups are those of a pp x dp x tp mesh
    plain = Mesh(dp=2, tp=2, pp=2)
    assert plain.groups_along("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert plain.groups_along("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
