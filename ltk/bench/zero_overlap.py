"""zero-overlap: what bucketed, overlapped communication buys ZeRO-1/2 (ltk/parallel/zero.py) on gloo
CPU processes: step time, the share of each step a rank sits in exposed communication (its per-rank
timeline, ltk/parallel/timeline.py), and the most gradient bytes a rank holds during backward, with
small buckets against one bucket, and optionally against the engine as it was at a git revision.

One bucket is the engine without overlap: its reduce-scatter can only start once backward has
produced every gradient (ZeRO-2 then holds all full gradients, then their flat copy: 2Ψ and more),
and the first layer's forward needs the one all-gather at once. Small buckets start reducing while
backward runs, free ZeRO-2's full gradients bucket by bucket, and let the first layers compute while
the later layers' parameters arrive. Gradient bytes are counted at every gradient's arrival (after
the engine's hook), right after every bucket is flattened (before its full gradients are freed) and
when the optimizer steps: full .grad tensors, flat buckets and shard outputs in flight, the gradient
buffers and reduced shards, each storage once.
All configurations are built up front and run in interleaved rounds (the order reversed every other
round), each round one untimed warm-up step then `steps` timed steps; a step's time is its slowest
rank's. On a 2-core machine the gloo transfers compete with the ranks' own compute for the cores,
so less exposed communication need not mean a shorter step: the timeline tells them apart.

    python -m ltk.bench.zero_overlap                    # 2 ranks, GPT L=6 d=256, 2 MiB buckets
    ltk bench zero-overlap --before b74e83a             # also the engine at that commit (no buckets)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from ltk.bench.harness import Row, Timing, environment
from ltk.parallel.dist import Comm, spawn
from ltk.parallel.reference import dp_shard, lm_loss, make_optimizer, synthetic_batches, tiny_gpt

ONE_BUCKET_MB = 1e6  # larger than any model here: a single bucket
ROOT = Path(__file__).resolve().parents[2]


def live_grad_bytes(eng, extra=()) -> int:
    """Gradient bytes a ZeRO-1/2 engine's rank holds now (module docstring), each storage once."""
    tensors = [p.grad for b in eng.buffers for p in b.layout.params] + [b.grad for b in eng.buffers]
    tensors += [getattr(b, attr, None) for b in eng.buffers for attr in ("reduced", "grad32")] + list(extra)
    tensors += [t for _, _, flat, out in eng._pending for t in (flat, out)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(seen.values())


def _probe(eng, peak: list[int]) -> None:
    """Record the peak at every gradient's arrival, right after every flatten of a bucket, and
    when the optimizer steps (an engine that reduces at step() holds its reduced shards then)."""
    def probe(*_):
        peak[0] = max(peak[0], live_grad_bytes(eng))
    for p in eng.module.parameters():  # registered after the engine's hook, so it runs after it
        p.register_post_accumulate_grad_hook(probe)
    eng.optimizer.register_step_pre_hook(probe)
    for buf in eng.buffers:
        flatten = buf.layout.flatten

        def probed(tensors, dtype, flatten=flatten):
            flat = flatten(tensors, dtype)
            peak[0] = max(peak[0], live_grad_bytes(eng, [flat]))
            return flat
        buf.layout.flatten = probed  # an instance attribute: only this buffer's layout


def _load(path: str | None):
    if path is None:
        return importlib.import_module("ltk.parallel.zero")
    spec = importlib.util.spec_from_file_location("zero_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _worker(rank, world, cfg, batch, seq, rounds, steps, bucket_mb, before):
    from ltk.parallel.timeline import Timeline

    torch.set_num_threads(1)
    configs = []  # (stage, provider, engine, peak)
    for stage in (1, 2):
        variants = [("one-bucket", None, ONE_BUCKET_MB), ("bucketed", None, bucket_mb)]
        variants += [("before", before, None)] if before else []
        for name, path, mb in variants:
            torch.manual_seed(0)
            model = tiny_gpt(**cfg)
            kw = {} if mb is None else {"bucket_mb": mb}
            eng = _load(path).ZeroEngine(model, model.param_groups(0.1), lambda g: make_optimizer(g, 1e-3), Comm(),
                                         stage=stage, **kw)
            peak = [0]
            _probe(eng, peak)
            configs.append((stage, name, eng, peak))
    data = [(dp_shard(x, rank, world), dp_shard(y, rank, world))
            for x, y in synthetic_batches(steps + 1, batch, seq, cfg["vocab_size"])]
    rows: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    k = 0
    with Timeline("cpu") as tl:
        for r in range(rounds):
            order = list(range(len(configs)))
            for i in order if r % 2 == 0 else order[::-1]:
                eng = configs[i][2]
                warm = k  # the first step warms up (optimizer state, allocator) and is dropped; it is
                for x, y in data:  # recorded all the same, so the all-gathers it posts are timed when waited for
                    tl.begin_step(k)
                    lm_loss(eng, x, y).backward()
                    eng.step()
                    eng.zero_grad()
                    tl.end_step()
                    k += 1
                rows[i] += [row for row in tl.flush() or [] if row["step"] != warm]
                if hasattr(eng, "wait_params"):  # nothing in flight while another engine runs
                    eng.wait_params()
    out = []
    for i, (stage, name, eng, peak) in enumerate(configs):
        out.append({"stage": stage, "provider": name, "rows": rows[i], "peak_grad_bytes": peak[0],
                    "grad_bytes_at_rest": eng.state_bytes()["grads"], "n_buckets": len(eng.buffers),
                    "psi": sum(p.numel() for p in eng.module.parameters())})
    return out


def summarize(rows: list[dict]) -> dict:
    """Step ms (the slowest rank's per step: median, p20, p80) and each share of the summed rank-steps."""
    by_step: dict[int, float] = {}
    for r in rows:
        by_step[r["step"]] = max(by_step.get(r["step"], 0.0), r["wall"])
    t = Timing.from_samples([1e3 * v for v in by_step.values()])
    wall = sum(r["wall"] for r in rows)
    ops: dict[str, float] = {}
    for r in rows:
        for op, s in r["comm_by_op"].items():
            ops[op] = ops.get(op, 0.0) + s
    return {"step_ms": (t.median_ms, t.p20_ms, t.p80_ms), "steps": t.runs,
            "comm_share": sum(r["comm"] for r in rows) / wall, "idle_share": sum(r["idle"] for r in rows) / wall,
            "comm_share_by_op": {k: v / wall for k, v in ops.items()}}


class Rows(list):
    """The rows, and `sections` (heading -> markdown) that ltk/bench/results.py writes after them."""

    sections: dict[str, str] = {}


def run(world: int = 2, rounds: int = 4, steps: int = 4, n_layer: int = 6, n_embd: int = 256, vocab: int = 512,
        seq: int = 64, batch: int = 8, bucket_mb: float = 2.0, before: str | None = None) -> Rows:
    """Rows per (stage, provider): provider one-bucket, bucketed (`bucket_mb`) or before (the
    engine file at git revision `before`); step time in the row, shares and gradient bytes in extra."""
    cfg = dict(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=vocab, block_size=seq)
    load = environment("cpu")["load_avg_1m"]
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if before:
            src = subprocess.run(["git", "show", f"{before}:ltk/parallel/zero.py"], cwd=ROOT, capture_output=True,
                                 text=True)
            if src.returncode:
                raise ValueError(f"--before {before}: cannot read ltk/parallel/zero.py there: {src.stderr.strip()}")
            path = str(Path(tmp) / "zero_before.py")
            Path(path).write_text(src.stdout)
        res = spawn(_worker, world, cfg, batch, seq, rounds, steps, bucket_mb, path, timeout_s=1800)[0]
    rows = Rows()
    for r in res:
        s = summarize(r["rows"])
        label = {"one-bucket": "one bucket", "bucketed": f"{bucket_mb:g} MiB buckets",
                 "before": f"at {before}, one per param group"}[r["provider"]]
        extra = {"world": world, "buckets": f"{label} ({r['n_buckets']})", "psi": r["psi"],
                 "peak_grad_bytes": r["peak_grad_bytes"], "grad_bytes_at_rest": r["grad_bytes_at_rest"],
                 "load_avg_1m": load, **{k: v for k, v in s.items() if k != "step_ms"}}
        shape = f"L={n_layer},d={n_embd},V={vocab},T={seq},B={batch}"
        rows.append(Row.stamped("cpu", op=f"zero{r['stage']}", shape=shape, dtype="fp32", mode="step",
                                provider=r["provider"], median_ms=s["step_ms"][0], p20_ms=s["step_ms"][1],
                                p80_ms=s["step_ms"][2], runs=s["steps"],
                                throughput=batch * seq / s["step_ms"][0] * 1e3, throughput_unit="tokens/s",
                                extra=json.dumps(extra)))
    rows.sections = {"Exposed communication and gradient memory": to_markdown(rows)}
    return rows


def to_markdown(rows) -> str:
    lines = ["| engine | buckets | step ms | exposed comm | reduce-scatter / all-gather | idle "
             "| peak gradient MB (× Ψ·4 B) | gradient MB at rest |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = json.loads(r.extra)
        ops, psi_bytes = e["comm_share_by_op"], 4 * e["psi"]
        lines.append(f"| {r.op} {r.provider} | {e['buckets']} | {r.median_ms:.0f} | {100 * e['comm_share']:.1f}% "
                     f"| {100 * ops.get('reduce_scatter', 0):.1f}% / {100 * ops.get('all_gather', 0):.1f}% "
                     f"| {100 * e['idle_share']:.1f}% | {e['peak_grad_bytes'] / 1e6:.1f} "
                     f"({e['peak_grad_bytes'] / psi_bytes:.2f}) | {e['grad_bytes_at_rest'] / 1e6:.1f} |")
    e = json.loads(rows[0].extra)
    lines.append(f"\nΨ = {e['psi']:,} parameters, fp32, {e['world']} gloo ranks × 1 thread, {e['steps']} timed steps "
                 f"each · load avg {e['load_avg_1m']:.2f}. Shares are of the summed rank-steps; exposed comm is "
                 "time blocked in a collective after every rank had posted it, idle the time before.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bucket-mb", type=float, default=2.0)
    p.add_argument("--before", help="git revision: also time ltk/parallel/zero.py as it was there")
    a = p.parse_args(argv)
    print(to_markdown(run(world=a.world, rounds=a.rounds, steps=a.steps, bucket_mb=a.bucket_mb, before=a.before)))


if __name__ == "__main__":
    main()
