"""parallel-engines: each of the lab's engines beside the production engine of the same strategy,
driven by the same training loop (`Trainer.train_step`, one config, one flag changed):

    strategy             ours (ltk/parallel/)          production
    data parallel        ddp                           torch-ddp (DistributedDataParallel)
    ZeRO-1               zero1                         deepspeed-zero1
    ZeRO-2               zero2                         deepspeed-zero2
    ZeRO-3 / FSDP        zero3                         fsdp2 (fully_shard), deepspeed-zero3
    tensor parallel      tp = world                    torch-tp (DTensor parallelize_module)
    pipeline             pp = world, 1F1B              torch-pp (torch.distributed.pipelining)

For each, on `world` gloo CPU processes (one thread each), max(2, world) micro-batches per step
(torch.distributed.pipelining needs one per stage):

    step ms       median [p20, p80] of `steps` timed optimizer steps per round, after a warm-up
                  step; providers run in `rounds` interleaved rounds, the order reversed every
                  other round, so load and warm-up hit all alike (rank 0's wall clock: the ranks
                  wait for each other in the collectives)
    peak MiB      the largest rank's peak resident memory above its baseline over building the
                  engine and 3 steps, each provider in a process group of its own (the kernel's
                  high-water mark VmHWM, reset after the imports and the data; on GPUs the
                  allocator's peak): what an engine costs, its private buffers included, which
                  no count of module and optimizer tensors would see (torch DDP's reducer
                  buckets, FSDP2's all-gather buffers, DeepSpeed's partitions)
    bytes/step    what the rank handed to its collectives in one step: the inputs of every
                  collective and send it issued (c10d and functional-collective ops, read at the
                  dispatcher with a TorchDispatchMode), summed — the same counter for every
                  engine, ours included (receives are counted at their sender)

Engines not available here (DeepSpeed not installed, an engine this checkout lacks) are listed
with the reason instead of a row.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ltk.bench.harness import Row, Timing

PAIRS = (  # (strategy, ours, production): provider = (name, --parallel.* overrides)
    ("data parallel", ("ddp", dict(strategy="ddp")), ("torch-ddp", dict(strategy="torch-ddp"))),
    ("ZeRO-1", ("zero1", dict(strategy="zero1")), ("deepspeed-zero1", dict(strategy="deepspeed-zero1"))),
    ("ZeRO-2", ("zero2", dict(strategy="zero2")), ("deepspeed-zero2", dict(strategy="deepspeed-zero2"))),
    ("ZeRO-3", ("zero3", dict(strategy="zero3")), ("fsdp2", dict(strategy="fsdp2"))),
    ("ZeRO-3", ("zero3", dict(strategy="zero3")), ("deepspeed-zero3", dict(strategy="deepspeed-zero3"))),
    ("tensor parallel", ("tp", dict(tp=0)), ("torch-tp", dict(strategy="torch-tp", tp=0))),
    ("pipeline", ("pp", dict(pp=0)), ("torch-pp", dict(pp=0, pp_engine="torch"))),
)


class Rows(list):
    """The rows, and `sections` (heading -> markdown) that ltk/bench/results.py writes after them."""

    sections: dict[str, str] = {}


def _config(cache: Path, out: Path, world: int, overrides: dict, n_layer: int, n_embd: int, seq: int, batch: int,
            device: str = "cpu"):
    from ltk.models.gpt import GPTConfig
    from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig

    cfg = RunConfig(
        name="engines",
        model=GPTConfig(vocab_size=0, block_size=seq, n_layer=n_layer, n_head=max(2, n_embd // 64), n_embd=n_embd,
                        dropout=0.0, bias=False),
        data=DataConfig(vocab_size=512, max_bytes=400_000, cache_dir=str(cache)),  # the embedded corpus
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        trainer=TrainerConfig(max_steps=10 ** 6, batch_size=batch, grad_accum=max(2, world), out_dir=str(out),
                              progress=False, seed=0, ckpt_every=0, dtype="fp32", timeline=False, device=device))
    cfg.model.backend = "torch"
    for k, v in overrides.items():
        setattr(cfg.parallel, k, world if v == 0 and k in ("tp", "pp") else v)
    return cfg


_SKIP = ("recv", "barrier", "wait", "_wrap_tensor_autograd")  # receives: counted at their sender


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    return sum(_nbytes(t) for t in x) if isinstance(x, (list, tuple)) else 0


def _sent_bytes(step) -> int:
    """Bytes of the inputs of every collective and send issued while `step()` runs, read at the
    dispatcher (c10d and functional-collective ops: torch DDP, FSDP2, DTensor, pipelining,
    DeepSpeed and our Comm all end there; module docstring)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                name = func._schema.name.split("::")[-1]
                if not any(k in name for k in _SKIP):
                    # c10d's gather/scatter kinds take (outputs, inputs, ...); the rest their input first
                    two = func.namespace == "c10d" and ("base_" in name or name.startswith(
                        ("allgather", "reduce_scatter", "alltoall")))
                    total[0] += _nbytes(args[1] if two else args[0])
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return total[0]


def _worker(rank, world, cache, root, names, kwargs, rounds, steps):
    from ltk.training.trainer import Trainer

    if kwargs["device"] == "cpu":
        torch.set_num_threads(1)
    trainers, notes = {}, {}
    for name, overrides in names:
        try:
            trainers[name] = Trainer(_config(Path(cache), Path(root) / f"{name}-r{rank}", world, overrides, **kwargs))
        except Exception as e:  # noqa: BLE001 - the same on every rank (config, missing package): reported
            notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    samples = {n: [] for n in trainers}
    order = list(trainers)
    for t in trainers.values():
        t.train_step()  # warm-up: optimizer state, allocator, pipeline shapes
    for r in range(rounds):
        for n in order if r % 2 == 0 else order[::-1]:
            for _ in range(steps):
                t0 = time.perf_counter()
                trainers[n].train_step()  # its loss .item() waits for the GPU
                samples[n].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for n, t in trainers.items():
        out[n] = {"ms": samples[n], "bytes": _sent_bytes(t.train_step)}
    return {"results": out, "notes": notes}


def _peak_worker(rank, world, cache, root, name, overrides, kwargs):
    """One provider alone: its peak memory above the baseline over build + 3 steps (docstring)."""
    from ltk.training.memory_watch import peak_rss_bytes, reset_peak_rss, rss_bytes
    from ltk.training.trainer import Trainer

    if kwargs["device"] == "cpu":
        torch.set_num_threads(1)
    if name.startswith("deepspeed-"):
        import deepspeed  # noqa: F401 - its import is not the engine's training memory
    cfg = _config(Path(cache), Path(root) / f"peak-{name}-r{rank}", world, overrides, **kwargs)
    from ltk.training.data import prepare_data

    prepare_data(cfg.data, verbose=False)  # built (or read) before the baseline, as every provider does
    cuda = kwargs["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    t = Trainer(cfg)
    for _ in range(3):
        t.train_step()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return peak - base


def run(world: int = 2, rounds: int = 3, steps: int = 4, n_layer: int = 4, n_embd: int = 128, seq: int = 64,
        batch: int = 8, device: str = "cpu") -> Rows:
    """Rows per provider (ours and production), grouped by strategy; ratios ours/theirs in extra.
    device "cuda": one process per GPU on NCCL (python -m ltk.bench.gpu_check --only engines)."""
    from ltk.parallel.dist import spawn
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    os.environ.setdefault("DS_ACCELERATOR", device)
    kwargs = dict(n_layer=n_layer, n_embd=n_embd, seq=seq, batch=batch, device=device)
    providers = list(dict.fromkeys(p for _, ours, theirs in PAIRS for p in (ours[0], theirs[0])))
    overrides = {n: o for _, ours, theirs in PAIRS for n, o in (ours, theirs)}
    with tempfile.TemporaryDirectory(prefix="ltk-engines-") as tmp:
        res = spawn(_worker, world, str(Path(tmp) / "cache"), tmp, [(n, overrides[n]) for n in providers], kwargs,
                    rounds, steps, timeout_s=3600, device=device)
        peaks = {}
        for n in providers:  # each alone, so one engine's buffers never count against another
            if n in res[0]["results"]:
                peaks[n] = max(spawn(_peak_worker, world, str(Path(tmp) / "cache"), tmp, n, overrides[n], kwargs,
                                     timeout_s=1800, device=device))
    per_rank = [r["results"] for r in res]
    notes = res[0]["notes"]
    load = os.getloadavg()[0]
    shape = f"L={n_layer},d={n_embd},T={seq},B={batch}x{max(2, world)}"
    rows = Rows()
    lines = ["| strategy | ours | production | step ms ours / theirs | ours/theirs | peak MiB/rank ours / theirs "
             "| sent bytes/step/rank ours / theirs |", "|---|---|---|---|---|---|---|"]
    for strategy, (ours, _), (theirs, _) in PAIRS:
        for name in (ours, theirs):
            if name not in per_rank[0] or any(r.provider == name and r.op == strategy for r in rows):
                continue
            t = Timing.from_samples(per_rank[0][name]["ms"])
            sent = max(r[name]["bytes"] for r in per_rank)
            rows.append(Row.stamped(device, op=strategy, shape=shape, dtype="fp32", mode=f"world={world}",
                                    provider=name, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                                    runs=t.runs, throughput=max(2, world) * batch * seq / t.median_ms * 1e3,
                                    throughput_unit="tokens/s",
                                    extra=json.dumps({"peak_bytes": peaks[name], "sent_bytes": sent,
                                                      "world": world, "load_avg_1m": load,
                                                      "ours": name == ours})))
        if ours in per_rank[0] and theirs in per_rank[0]:
            a, b = (next(r for r in rows if r.provider == n) for n in (ours, theirs))
            ea, eb = json.loads(a.extra), json.loads(b.extra)
            lines.append(f"| {strategy} | {ours} | {theirs} | {a.median_ms:.1f} / {b.median_ms:.1f} "
                         f"| {a.median_ms / b.median_ms:.2f} "
                         f"| {ea['peak_bytes'] / 2**20:.1f} / {eb['peak_bytes'] / 2**20:.1f} "
                         f"| {ea['sent_bytes']:,} / {eb['sent_bytes']:,} |")
        else:
            missing = [n for n in (ours, theirs) if n not in per_rank[0]]
            lines.append(f"| {strategy} | {ours} | {theirs} | not run: "
                         + "; ".join(f"{n}: {notes.get(n, 'not built')}" for n in missing) + " | | | |")
    ranks = f"{world} gloo ranks x 1 thread" if device == "cpu" else f"{world} GPUs on NCCL"
    lines.append(f"\n{shape}, {ranks}, fp32 · load avg {load:.2f} · ratios below 1: ours "
                 "is faster")
    rows.sections = {f"Ours vs production, {world} processes": "\n".join(lines)}
    return rows
