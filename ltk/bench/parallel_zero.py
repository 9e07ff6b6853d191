"""parallel-zero: step time of our ZeRO-1/2/3 (ltk/parallel/zero.py, ltk/parallel/zero3.py) against
PyTorch FSDP2 and, where installed, DeepSpeed ZeRO 1/2/3, on gloo CPU processes; and the model
state bytes each of our ranks holds, measured, beside the cost model (ltk/parallel/cost.py).

What is compared. One step = forward, cross-entropy, backward, optimizer step, zero_grad, on the
same GPT (dropout 0, torch backend), the same data (fixed seeded batches, each rank its rows),
the same torch AdamW (foreach=False, parallel.reference.make_optimizer) and one thread per rank:

    ours-zero1/2/3   ZeroEngine(stage=1/2), Zero3Engine (units: the transformer blocks + root)
    fsdp2            fully_shard on every block, then the root (reshard after forward: ZeRO-3)
    fsdp2-noreshard  the same with reshard_after_forward=False (params kept between forward and
                     backward: FSDP's SHARD_GRAD_OP, the closest FSDP2 has to ZeRO-2)
    deepspeed-zero1/2/3  deepspeed.initialize with the same AdamW as a client optimizer
                     (DS_ACCELERATOR=cpu, gloo), when `import deepspeed` works

Both dtypes (--dtype): fp32 everywhere, and bf16 mixed precision as each engine defines it —
ours `compute_dtype="bf16"` (bf16 parameters, gradients and collectives, an fp32 master shard;
ltk/parallel/mixed.py), FSDP2 `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)` (fp32
sharded parameters cast at all-gather), DeepSpeed `"bf16": {"enabled": true}`. Ratios compare
providers of the same dtype only.

Ratios are ours/theirs of the median step time (below 1: ours is faster): ZeRO-3 against fsdp2
(goal ≤ 1.1), ZeRO-2 against fsdp2-noreshard, stage s against deepspeed-zero<s> (goal ≤ 1.0).
Providers run in interleaved rounds (the order reversed every other round) so load and warm-up
hit all alike; each round times `steps` steps after one warm-up step, per-step wall clock on
rank 0 (ranks wait for each other in the collectives). The 1-minute load average is reported:
on a shared machine the absolute numbers move, the interleaved ratios much less.

    python -m ltk.bench.parallel_zero                 # 2 ranks, GPT L=4 d=128 V=512 T=64, B=8
    python -m ltk.bench.parallel_zero --world 4 --rounds 5
    python -m ltk.bench.parallel_zero --dtype bf16    # the bf16 rows only (default: fp32 and bf16)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from ltk.bench.harness import Row, Timing, environment
from ltk.parallel import cost
from ltk.parallel.dist import Comm, spawn
from ltk.parallel.reference import dp_shard, lm_loss, make_optimizer, synthetic_batches, tiny_gpt
from ltk.parallel.zero import ZeroEngine
from ltk.parallel.zero3 import Zero3Engine


def _ours(stage, cfg, dtype):
    model = tiny_gpt(**cfg)
    factory = lambda gs: make_optimizer(gs, 1e-3)  # noqa: E731
    if stage == 3:
        eng = Zero3Engine(model, model.param_groups(0.1), factory, Comm(), compute_dtype=dtype)
    else:
        eng = ZeroEngine(model, model.param_groups(0.1), factory, Comm(), stage=stage, compute_dtype=dtype)

    def update():
        eng.step()
        eng.zero_grad()
    return (lambda x, y: lm_loss(eng, x, y).backward(), update), eng


def _fsdp2(cfg, reshard, dtype):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tiny_gpt(**cfg)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if dtype == "bf16"
          else MixedPrecisionPolicy())
    for block in model.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    opt = make_optimizer(model.param_groups(0.1), 1e-3)

    def update():
        opt.step()
        opt.zero_grad()
    return lambda x, y: lm_loss(model, x, y).backward(), update


def _deepspeed(stage, cfg, micro_batch, dtype):
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    model = tiny_gpt(**cfg)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9, "bf16": {"enabled": dtype == "bf16"}}
    eng, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model.param_groups(0.1), 1e-3),
                                   config=config)

    return lambda x, y: eng.backward(lm_loss(eng, x, y)), eng.step  # its step also zeroes the gradients


def _key(name, dtype):
    return name if dtype == "fp32" else f"{name}@{dtype}"


def _worker(rank, world, cfg, batch, seq, rounds, steps, with_deepspeed, dtypes):
    providers, notes, mem = {}, [], {}
    for dtype in dtypes:
        prec = cost.Precision.of(dtype)
        for stage in (1, 2, 3):
            providers[_key(f"ours-zero{stage}", dtype)], eng = _ours(stage, cfg, dtype)
            psi = sum(p.numel() for p in eng.module.parameters())
            mem[_key(f"ours-zero{stage}", dtype)] = {
                "engine": eng, "model": cost.model_state_bytes(psi, world, stage, prec),
                "padded": [cost.model_state_bytes(n, world, stage, prec) for n in eng.padded_numels()]}
        providers[_key("fsdp2", dtype)] = _fsdp2(cfg, True, dtype)
        providers[_key("fsdp2-noreshard", dtype)] = _fsdp2(cfg, False, dtype)
        if with_deepspeed:
            os.environ["DS_ACCELERATOR"] = "cpu"
            try:
                for stage in (1, 2, 3):
                    providers[_key(f"deepspeed-zero{stage}", dtype)] = _deepspeed(stage, cfg, batch // world, dtype)
            except Exception as e:  # noqa: BLE001 - report why, time the others
                notes.append(f"deepspeed {dtype} not timed: {e!r}")
    data = [(dp_shard(x, rank, world), dp_shard(y, rank, world))
            for x, y in synthetic_batches(4, batch, seq, cfg["vocab_size"])]
    samples = {name: ([], []) for name in providers}  # per step: (step ms, forward+backward ms)
    names = list(providers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            compute, update = providers[name]
            compute(*data[0])  # warm-up: optimizer state, allocator
            update()
            for i in range(steps):
                t0 = time.perf_counter()
                compute(*data[i % len(data)])
                t1 = time.perf_counter()
                update()
                samples[name][0].append((time.perf_counter() - t0) * 1e3)
                samples[name][1].append((t1 - t0) * 1e3)
    for name, m in mem.items():
        m["measured"] = m.pop("engine").state_bytes()
        m["padded"] = {k: sum(d[k] for d in m["padded"]) for k in m["model"]}
    return {"samples": samples, "mem": mem, "notes": notes}


def run(world: int = 2, rounds: int = 3, steps: int = 5, n_layer: int = 4, n_embd: int = 128, vocab: int = 512,
        seq: int = 64, batch: int = 8, deepspeed: bool | None = None,
        dtype: str = "both") -> list[Row]:
    """Time every provider. Our rows carry speedup = theirs/ours against the goal's baseline
    (ZeRO-3: fsdp2; ZeRO-1/2: deepspeed, else fsdp2-noreshard for ZeRO-2) and, in `extra`, both
    ratios ours/theirs and our measured vs modelled bytes per rank."""
    if deepspeed is None:
        import importlib.util
        deepspeed = importlib.util.find_spec("deepspeed") is not None
    if dtype not in ("fp32", "bf16", "both"):
        raise ValueError(f"dtype must be fp32, bf16 or both, got {dtype!r}")
    dtypes = ("fp32", "bf16") if dtype == "both" else (dtype,)
    cfg = dict(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab, block_size=seq)
    env = environment("cpu")
    out = spawn(_worker, world, cfg, batch, seq, rounds, steps, deepspeed, tuple(dtypes), timeout_s=1800)[0]
    timings = {k: Timing.from_samples(v[0]) for k, v in out["samples"].items()}
    med = {k: t.median_ms for k, t in timings.items()}
    rows = []
    for name, t in timings.items():
        base, _, dt = name.partition("@")
        dt = dt or "fp32"
        extra = {"world": world, "load_avg_1m": env["load_avg_1m"], "notes": out["notes"],
                 "fwd_bwd_ms": Timing.from_samples(out["samples"][name][1]).median_ms}
        speedup = None
        if name in out["mem"]:
            stage = int(base[-1])
            fsdp = {2: _key("fsdp2-noreshard", dt), 3: _key("fsdp2", dt)}.get(stage)
            ds = _key(f"deepspeed-zero{stage}", dt)
            ratios = {"vs_fsdp2": (fsdp, med[name] / med[fsdp]) if fsdp else None,
                      "vs_deepspeed": (ds, med[name] / med[ds]) if ds in med else None}
            goal = ratios["vs_fsdp2"] if stage == 3 or ratios["vs_deepspeed"] is None else ratios["vs_deepspeed"]
            speedup = 1 / goal[1] if goal else None
            extra.update(memory=out["mem"][name], **ratios)
        rows.append(Row.stamped("cpu", op="zero-step", shape=f"L={n_layer},d={n_embd},V={vocab},T={seq},B={batch}",
                                dtype=dt, mode="step", provider=base, median_ms=t.median_ms, p20_ms=t.p20_ms,
                                p80_ms=t.p80_ms, runs=t.runs, throughput=batch * seq / t.median_ms * 1e3,
                                throughput_unit="tokens/s", speedup=speedup, extra=json.dumps(extra)))
    return rows


def to_markdown(rows: list[Row]) -> str:
    lines = ["| provider | dtype | step ms: median [p20, p80] | fwd+bwd ms | ours/fsdp2 | ours/deepspeed "
             "| bytes/rank measured: params/grads/optim | cost model at Ψ | at padded Ψ̃ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = json.loads(r.extra)
        ratio = [f"{e[k][1]:.2f} ({e[k][0]})" if e.get(k) else "" for k in ("vs_fsdp2", "vs_deepspeed")]
        m = e.get("memory")
        mem = ([" / ".join(f"{v:,}" for v in m[k].values()) for k in ("measured", "model", "padded")]
               if m else ["", "", ""])
        lines.append(f"| {r.provider} | {r.dtype} | {r.median_ms:.1f} [{r.p20_ms:.1f}, {r.p80_ms:.1f}] "
                     f"| {e['fwd_bwd_ms']:.1f} | " + " | ".join(ratio + mem) + " |")
    e = json.loads(rows[0].extra)
    lines.append(f"\n{rows[0].shape}, {e['world']} gloo ranks x 1 thread · {rows[0].device} · "
                 f"commit {rows[0].commit} · torch {rows[0].torch} · {rows[0].date} · load avg {e['load_avg_1m']:.2f}")
    lines += [f"\n{n}" for n in e["notes"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    a = p.parse_args(argv)
    print(to_markdown(run(a.world, a.rounds, a.steps, deepspeed=False if a.no_deepspeed else None, dtype=a.dtype)))


if __name__ == "__main__":
    main()
