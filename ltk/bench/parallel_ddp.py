"""parallel-ddp: the time of one data-parallel training step, our engines against torch's DDP.

One step is forward, loss, backward (with the gradient all-reduce) and the AdamW step, on a
GPT larger than the tests' (4 layers, width 128, vocabulary 512, 64 tokens, 8 rows per rank by
default), in `world` gloo CPU processes of one thread each. Providers, all in the same processes
on the same data from the same initial weights:

    ddp        parallel.ddp.DDP: buckets (25 MiB, first 1 MiB, torch's defaults), overlapped
    naive      parallel.ddp.NaiveDDP: one blocking all-reduce per parameter after backward
    torch-ddp  torch.nn.parallel.DistributedDataParallel (its C++ reducer), the baseline
    local      the same step with no communication at all: the floor under every provider

Providers alternate in rounds, the order reversed every other round (ABC CBA ...), so warm-up,
background load and clock changes hit all alike; a step's time is the slowest rank's (ranks are
in lockstep through their all-reduces), and the median over the pooled steps is reported with
p20/p80. `ratio` is a provider's median over torch-ddp's (goal for ddp: <= 1.05); `paired ratio` is
the median over rounds of the same ratio within one round, which cancels drift between rounds
(on a shared machine, the steadier of the two). The per-step
all-reduce calls and payload bytes of our engines are counted by parallel.dist.STATS and checked
against parallel.cost.zero_comm_bytes.

    python -m ltk.bench.parallel_ddp                      # 2 ranks, 64 timed steps per provider
    python -m ltk.bench.parallel_ddp --world 4 --steps 60
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from ltk.bench.harness import Row, environment
from ltk.models.gpt import GPT, GPTConfig
from ltk.parallel.cost import zero_comm_bytes
from ltk.parallel.ddp import DDP, NaiveDDP
from ltk.parallel.dist import STATS, Comm, spawn
from ltk.parallel.reference import dp_shard, lm_loss, make_optimizer, synthetic_batches

PROVIDERS = ("ddp", "naive", "torch-ddp", "local")


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = torch.quantile(torch.tensor(xs, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def _make_step(provider: str, cfg: GPTConfig, batches, bucket_cap_mb: float | None):
    """A closure running one training step of `provider` per call, cycling through `batches`."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    if provider in ("ddp", "naive"):
        caps = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb, "first_bucket_mb": bucket_cap_mb}
        engine = (DDP(model, model.parameters(), make_optimizer, Comm(), **caps) if provider == "ddp"
                  else NaiveDDP(model, model.parameters(), make_optimizer, Comm()))
        fwd, opt_step, zero = engine, engine.step, engine.zero_grad
    else:
        fwd = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb) \
            if provider == "torch-ddp" else model
        opt = make_optimizer(model.parameters())
        opt_step, zero = opt.step, lambda: opt.zero_grad(set_to_none=True)
    i = 0

    def step() -> None:
        nonlocal i
        x, y = batches[i % len(batches)]
        i += 1
        lm_loss(fwd, x, y).backward()
        opt_step()
        zero()

    return step, sum(p.numel() for p in model.parameters())


def _worker(rank: int, world: int, cfg: dict, batch: int, steps: int, rounds: int, warmup: int,
            bucket_cap_mb: float | None) -> dict:
    cfg = GPTConfig(**cfg)
    batches = [(dp_shard(x, rank, world), dp_shard(y, rank, world))  # (batch, T) per rank
               for x, y in synthetic_batches(4, batch * world, cfg.block_size, cfg.vocab_size)]
    made = {p: _make_step(p, cfg, batches, bucket_cap_mb) for p in PROVIDERS}
    fns = {p: f for p, (f, _) in made.items()}
    for _ in range(warmup):  # torch DDP rebuilds its buckets after its first step; allocations settle
        for p in PROVIDERS:
            fns[p]()
    samples = {p: [[] for _ in range(rounds)] for p in PROVIDERS}  # ms, by round
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        for p in PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]:
            dist.barrier()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fns[p]()
                samples[p][r].append((time.perf_counter() - t0) * 1e3)
    counts = {}
    for p in ("ddp", "naive"):  # one more step, counted
        STATS.reset()
        fns[p]()
        counts[p] = STATS.snapshot()
    return {"samples": samples, "counts": counts, "num_params": made["ddp"][1]}


def run(world: int = 2, steps: int = 64, rounds: int = 16, warmup: int = 3, n_layer: int = 4, n_head: int = 4,
        n_embd: int = 128, vocab_size: int = 512, seq_len: int = 64, batch: int = 8,
        bucket_cap_mb: float | None = None, timeout_s: float = 600) -> list[dict]:
    """Time each provider's step; one dict per provider. `batch` is rows per rank; `steps` timed
    steps per provider, split over `rounds`; bucket_cap_mb None = torch's defaults for both DDPs."""
    if world < 2:
        raise ValueError(f"world must be >= 2 to have anything to communicate, got {world}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rounds = max(1, min(rounds, steps))  # at least one step per provider per round
    env = environment("cpu")
    cfg = dict(vocab_size=vocab_size, block_size=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
               dropout=0.0, backend="torch")
    per_rank = spawn(_worker, world, cfg, batch, steps, rounds, warmup, bucket_cap_mb, timeout_s=timeout_s)
    num_params = per_rank[0]["num_params"]
    want = zero_comm_bytes(num_params, stage=0)
    # a step takes as long as its slowest rank: (rounds, steps per round) per provider
    by_round = {p: [[max(ts) for ts in zip(*(r["samples"][p][k] for r in per_rank))] for k in range(rounds)]
                for p in PROVIDERS}
    step_ms = {p: [t for rnd in by_round[p] for t in rnd] for p in PROVIDERS}
    base = _quantiles(step_ms["torch-ddp"])[0]
    rows = []
    for p in PROVIDERS:
        med, p20, p80 = _quantiles(step_ms[p])
        c = per_rank[0]["counts"].get(p)
        if c is not None and c["payload_bytes"] != want:
            raise RuntimeError(f"{p} sent {c['payload_bytes']} per step, the cost model says {want}")
        rows.append({
            "op": "ddp-step", "provider": p, "world": world, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
            "steps": len(step_ms[p]), "ratio_vs_torch": med / base,
            "paired_ratio_vs_torch": _quantiles([_quantiles(a)[0] / _quantiles(b)[0]
                                                 for a, b in zip(by_round[p], by_round["torch-ddp"])])[0],
            "all_reduce_calls": c["calls"].get("all_reduce") if c else None,
            "payload_bytes": c["total_payload_bytes"] if c else None,
            "shape": f"B={batch}/rank,T={seq_len},L={n_layer},d={n_embd},H={n_head},V={vocab_size}",
            "num_params": num_params, "bucket_cap_mb": bucket_cap_mb, "threads_per_rank": 1,
            "device": env["device"], "torch": env["torch"], "commit": env["commit"], "date": env["date"],
            "load_avg_1m_before": env["load_avg_1m"],
        })
    return rows


def run_rows(world: int = 2, steps: int = 64, rounds: int = 16, n_layer: int = 4, n_embd: int = 128,
             vocab_size: int = 512, seq_len: int = 64, batch: int = 8) -> list[Row]:
    """`run` as rows of the results CSV (`ltk bench parallel-ddp`): speedup = torch-ddp's median
    step time / the provider's; the counts and the paired ratio go to `extra`."""
    out = []
    for r in run(world=world, steps=steps, rounds=rounds, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size,
                 seq_len=seq_len, batch=batch):
        extra = {k: r[k] for k in ("world", "paired_ratio_vs_torch", "all_reduce_calls", "payload_bytes", "num_params",
                                   "threads_per_rank", "load_avg_1m_before")}
        out.append(Row.stamped("cpu", op="ddp-step", shape=r["shape"], dtype="fp32", mode="step",
                               provider=r["provider"], median_ms=r["median_ms"], p20_ms=r["p20_ms"],
                               p80_ms=r["p80_ms"], runs=r["steps"],
                               throughput=batch * world * seq_len / r["median_ms"] * 1e3, throughput_unit="tokens/s",
                               speedup=1 / r["ratio_vs_torch"], extra=json.dumps(extra)))
    return out


def to_markdown(rows: list[dict]) -> str:
    lines = ["| provider | world | median ms [p20, p80] | ratio vs torch-ddp | paired ratio | all-reduces/step "
             "| payload MB/step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = "" if r["payload_bytes"] is None else f"{r['payload_bytes'] / 2**20:.2f}"
        lines.append(f"| {r['provider']} | {r['world']} | {r['median_ms']:.1f} [{r['p20_ms']:.1f}, {r['p80_ms']:.1f}] "
                     f"| {r['ratio_vs_torch']:.3f} | {r['paired_ratio_vs_torch']:.3f} | {r['all_reduce_calls'] or ''} "
                     f"| {mb} |")
    r = rows[0]
    lines.append(f"\n{r['shape']}, {r['num_params']:,} params, {r['steps']} steps per provider · {r['device']} · "
                 f"torch {r['torch']} · commit {r['commit']} · {r['date']} · load {r['load_avg_1m_before']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="timed steps per provider")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="rows per rank")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--bucket-cap-mb", type=float, default=None)
    a = ap.parse_args(argv)
    rows = run(world=a.world, steps=a.steps, rounds=a.rounds, batch=a.batch, seq_len=a.seq_len, n_layer=a.n_layer,
               n_embd=a.n_embd, vocab_size=a.vocab_size, bucket_cap_mb=a.bucket_cap_mb)
    print(to_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
