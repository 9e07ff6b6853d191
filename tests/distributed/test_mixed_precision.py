"""bf16 mixed precision in every engine (ltk/parallel/mixed.py, zero.py, zero3.py, ddp.py,
pipeline_run.py), on gloo processes:

  * parity: 2 ranks of ddp, naive-ddp, zero1, zero2, zero3 train like one process doing the same
    mixed precision (reference.train_single_mixed: bf16 parameters, fp32 masters, the gradient
    formed as 2 ranks form it): losses and fp32 masters within 1e-5;
  * `ltk plan` and `ltk train` agree: the payload bytes the collectives layer counts in one step
    of the training engine (ltk/training/engine.py, as `ltk train` builds it) equal the plan's,
    by collective, for ddp, zero1/2/3, tp and pp at 2 and 4 ranks, in fp32 and bf16 (and one
    fp32 reduction). Scalars (the loss, a squared norm: <= 8 bytes) are not in the plan.

One spawn per world size runs every configuration of that size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ltk.models.gpt import GPT, GPTConfig
from ltk.parallel.dist import STATS, Comm, spawn
from ltk.parallel.plan import plan
from ltk.parallel.reference import (
    dp_shard,
    lm_loss,
    make_optimizer,
    max_rel_error,
    synthetic_batches,
    tiny_gpt,
    train_single_mixed,
)
from ltk.parallel.strategy import build_engine as dp_engine
from ltk.training.config import RunConfig
from ltk.training.engine import build_engine
from ltk.training.objectives import objective_for

# LR as tests/distributed/test_zero.py argues: Adam maps an element's gradient to about ±lr whatever
# its size, so at 1e-2 a one-ulp difference of the clip norm (its summation order) decides which
# way a few bf16 weights round and grows to percent-level differences within three steps
LR, CLIP, STEPS, VOCAB, SEQ = 3e-4, 0.5, 3, 96, 16
BATCHES = synthetic_batches(STEPS, 8, SEQ, VOCAB)
PARITY = ("ddp", "naive-ddp", "zero1", "zero2", "zero3")
# world -> (strategy, tp, pp, dtype, reduce_dtype, micro-batches)
BYTES = {
    2: [(s, 1, 1, d, None, 1) for s in ("ddp", "zero1", "zero2", "zero3") for d in ("fp32", "bf16")]
    + [("zero2", 1, 1, "bf16", "fp32", 1), ("ddp", 1, 1, "bf16", "fp32", 1), ("none", 2, 1, "bf16", None, 1),
       ("none", 1, 2, "bf16", None, 2)],
    4: [("ddp", 1, 1, "fp32", None, 1), ("zero2", 1, 1, "fp32", None, 1), ("zero1", 1, 1, "bf16", None, 1),
        ("zero3", 1, 1, "bf16", None, 1), ("zero3", 1, 1, "bf16", "fp32", 1), ("zero1", 2, 1, "bf16", None, 1),
        ("ddp", 2, 1, "fp32", None, 1), ("ddp", 1, 2, "bf16", None, 2)],
}


def _model_cfg() -> GPTConfig:
    # every ZeRO buffer (param group, unit) divides by 4: the plan's Ψ is then the padded count
    return GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False,
                     backend="torch")


def _run_config(strategy, tp, pp, dtype, reduce, micro) -> RunConfig:
    cfg = RunConfig(model=_model_cfg())
    cfg.trainer.dtype, cfg.trainer.batch_size, cfg.trainer.grad_accum = dtype, 8, micro
    cfg.parallel.strategy, cfg.parallel.tp, cfg.parallel.pp = strategy, tp, pp
    cfg.parallel.reduce_dtype = reduce or "auto"
    return cfg


def _counted_step(cfg: RunConfig) -> dict[str, int]:
    """One training step of the engine `ltk train` builds; payload bytes by collective."""
    torch.manual_seed(0)
    run = build_engine(GPT(cfg.model), cfg, torch.device("cpu"))
    x, y = BATCHES[0]
    m = cfg.trainer.grad_accum
    keep = STATS.record
    STATS.record = lambda op, n, g: keep(op, n, g) if n > 8 else None  # scalars: not the plan's
    STATS.reset()
    try:
        if cfg.parallel.pp > 1:
            xs = torch.cat([run.rows(x)] * m)  # m global micro-batches, this rank's rows of each
            run.forward_backward(xs, torch.cat([run.rows(y)] * m))
            run.step()
        else:
            objective = objective_for("gpt", VOCAB, 0)
            for i in range(m):
                with run.engine.no_sync() if i < m - 1 else torch.enable_grad():
                    (run.loss(objective, run.rows(x), run.rows(y), torch.Generator()) / m).backward()
            run.engine.step()
        return dict(STATS.payload)
    finally:
        STATS.record = keep


def _parity(rank, world):
    out = {}
    for name in PARITY:
        for reduce in (torch.bfloat16, torch.float32) if name in ("ddp", "zero2") else (torch.bfloat16,):
            model = tiny_gpt(bias=False)
            eng = dp_engine(name, model, list(model.parameters()), lambda gs: make_optimizer(gs, LR), Comm(),
                            torch.device("cpu"), "bf16", reduce_dtype="fp32" if reduce == torch.float32 else None)
            losses = []
            for x, y in BATCHES:
                loss = lm_loss(eng, dp_shard(x, rank, world), dp_shard(y, rank, world))
                loss.backward()
                eng.clip_grad_norm_(CLIP)
                eng.step()
                eng.zero_grad()
                total = loss.detach().float()
                dist.all_reduce(total)
                losses.append(total.item() / world)
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            out[name, str(reduce)] = losses, {k: v.float() for k, v in eng.full_state_dict().items()}
    return out


def _worker(rank, world):
    res = {"bytes": [_counted_step(_run_config(*c)) for c in BYTES[world]]}
    if world == 2:
        res["parity"] = _parity(rank, world)
        if rank == 0:  # here, not in the test's process: one thread, so bf16 matmuls round as the ranks' do
            res["ref"] = {str(dt): train_single_mixed(tiny_gpt(bias=False), BATCHES, LR, dp=2, grad_clip=CLIP,
                                                      reduce_dtype=dt) for dt in (torch.bfloat16, torch.float32)}
    return res


def _planned(world, strategy, tp, pp, dtype, reduce, micro) -> dict[str, int]:
    p = plan("gpt", _model_cfg(), world=world, strategy="ddp" if strategy == "none" else strategy, tp=tp, pp=pp,
             batch=8 * (micro if pp > 1 else 1), seq_len=SEQ, micro_batches=micro, dtype=dtype, reduce_dtype=reduce)
    total: dict[str, int] = {}
    for part in p["comm"].values():
        for op, b in part.items():
            total[op] = total.get(op, 0) + b
    return total


def test_bf16_engines_match_one_process_and_the_plan():
    by_world = {w: spawn(_worker, w, timeout_s=240) for w in (2, 4)}
    for world, per_rank in by_world.items():
        for i, c in enumerate(BYTES[world]):
            want = _planned(world, *c)
            # the plan reports the busiest rank (a pipeline's middle stages send both ways; its
            # first and last hold the tied weight), and counts the sends of p2p traffic, not the receives
            got = max((r["bytes"][i] for r in per_rank), key=lambda d: (d.get("send", 0), d.get("all_reduce", 0)))
            got = {op: b for op, b in got.items() if op != "recv"}
            assert got == want, (world, c, got, want)
    for name, reduce in by_world[2][0]["parity"]:
        want_losses, want_params = by_world[2][0]["ref"][reduce]
        for rank in by_world[2]:
            losses, params = rank["parity"][name, reduce]
            # relative, as every parity test here: one bf16 weight rounded the other way (a 1e-9
            # difference of the fp32 norms' summation order) moves a loss of 4.5 by ~1e-5 absolute
            assert max(abs(a - b) / b for a, b in zip(losses, want_losses)) <= 1e-5, (name, reduce, losses)
            params = {k: v for k, v in params.items() if k in want_params}
            assert max_rel_error(params, want_params) <= 1e-5, (name, reduce)
