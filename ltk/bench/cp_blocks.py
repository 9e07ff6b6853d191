"""Forward + backward of a stack of model blocks on one sequence split over a context-parallel
group: what each rank holds, sends, computes and waits for — the measurement path of the
long-context lab (ltk/labs/long_context.py), independent of the training loop.

Every rank builds the same L blocks of the model (ltk/models/gpt.py or llama.py, fp32, seeded),
draws the same (B, T, d) hidden states and keeps its shard (ContextParallel.shard: T padded to
2N chunks, two chunks a rank, `layout` zig-zag or contiguous); each block's attention call goes
to ContextParallel.attention (ring or Ulysses) instead of the single-device kernel, the rest of
the block acting per position as it always does. One case is (impl, layout, N, T); impl "none"
is one process and the model's own attention. Per rank:

    saved_peak    the peak of the bytes autograd keeps saved for backward during one step
                  (ltk/training/memory.py ActivationPeak: the project's "activations")
    live_peak     the peak of every tensor alive during the step (ltk/bench/live_bytes.py on a
                  CPU: activations, gradients, communication buffers, the ring's CPU score
                  tiles; torch.cuda.max_memory_allocated minus what existed before on CUDA)
    cp            CP_STATS of the step: bytes sent, c×c score tiles, kept (query, key) pairs
    step_s        wall seconds of forward + backward, barrier to barrier (the slowest rank)
    cpu_s         this rank's thread CPU seconds of the step (CPU only: what sharing cores with
                  other processes does not inflate; None on CUDA)
    attn_s        this rank's seconds inside the attention kernels (the ring's block kernels,
                  Ulysses' and no-CP's local attention, forward + backward): thread CPU time on
                  a CPU, so ranks sharing cores are not charged for each other; synchronised
                  wall time on CUDA
    timeline      ltk/parallel/timeline.py per rank: compute, exposed comm, idle (rank 0 gets all)

The attention kernels are timed by wrapping them for the duration of a case (`_timed_kernels`):
the ring calls ring_attention.block_forward / block_backward, Ulysses and no CP the kernel
attention, whose backward is bracketed by two identity autograd nodes (`_Mark`).
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

IMPLS = ("none", "ring", "ulysses")


@dataclass(frozen=True)
class Case:
    impl: str  # none | ring | ulysses
    layout: str  # zigzag | contiguous ("-" for none)
    cp: int
    T: int
    timed: bool = True  # False: the memory and bytes pass only (a long T on a small machine)


class _Clock:
    """Seconds this thread computed (CPU) or synchronised wall seconds (CUDA)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.thread_time()


class _Mark(torch.autograd.Function):
    """Identity whose backward stamps the clock: after the kernel's output ("start": its
    backward begins) and before its inputs ("end": its backward is over)."""

    @staticmethod
    def forward(ctx, timer, what, *ts):
        ctx.timer, ctx.what = timer, what
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx, *grads):
        ctx.timer.stamp(ctx.what)
        return (None, None, *grads)


class AttentionTimer:
    def __init__(self, cuda: bool):
        self.clock, self.seconds, self._start = _Clock(cuda), 0.0, None

    def stamp(self, what: str) -> None:
        if what == "start":
            self._start = self.clock()
        elif self._start is not None:
            self.seconds += self.clock() - self._start
            self._start = None

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = self.clock()
            out = fn(*args, **kwargs)
            self.seconds += self.clock() - t0
            return out
        return timed

    def wrap_autograd(self, fn):
        """fn(q, k, v, **kw) differentiable: time its forward and (by the marks) its backward."""
        def timed(q, k, v, **kwargs):
            q, k, v = _Mark.apply(self, "end", q, k, v)
            t0 = self.clock()
            o = fn(q, k, v, **kwargs)
            self.seconds += self.clock() - t0
            return _Mark.apply(self, "start", o)[0]
        return timed


@contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def _timed_kernels(model_module, blocks, case: Case, cp, timer: AttentionTimer):
    """The blocks attend as the training loop makes them (cp_train.attach: their attention
    modules call ring or Ulysses attention); the attention kernels are wrapped by the timer
    for the duration of the case (the only patching: to time, not to route)."""
    from ltk.parallel import ring_attention, ulysses
    from ltk.parallel.cp_train import attach

    if case.impl == "none":
        with _patched(model_module, "attention", timer.wrap_autograd(model_module.attention)):
            yield
        return
    attach(blocks, cp)
    try:
        with _patched(ring_attention, "block_forward", timer.wrap(ring_attention.block_forward)), \
                _patched(ring_attention, "block_backward", timer.wrap(ring_attention.block_backward)), \
                _patched(ulysses, "attention", timer.wrap_autograd(ulysses.attention)):
            yield
    finally:
        attach(blocks, None)


def build_blocks(model: dict, device):
    """(module of the model family, its blocks as a ModuleList, forward(x, positions) -> y)."""
    torch.manual_seed(0)
    family, cfg_kw = model["family"], {k: v for k, v in model.items() if k != "family"}
    if family == "gpt":
        from ltk.models import gpt as mod

        cfg = mod.GPTConfig(**cfg_kw, vocab_size=1, bias=False, dropout=0.0)
        blocks = torch.nn.ModuleList(mod.Block(cfg) for _ in range(cfg.n_layer)).to(device)

        def forward(x, positions):  # GPT's positions are in its embedding, outside the blocks
            h, d = x, None
            for b in blocks:
                h, d = b(h, d)
            return h + d
    elif family == "llama":
        from ltk.models import llama as mod

        cfg = mod.LlamaConfig(**cfg_kw, vocab_size=1)
        blocks = torch.nn.ModuleList(mod.Block(cfg, i) for i in range(cfg.n_layer)).to(device)

        def forward(x, positions):
            cos, sin = mod.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # (T_local, D): RoPE at global ids
            h, d = x, None
            for b in blocks:
                h, d = b(h, d, cos, sin)
            return h + d
    else:
        raise ValueError(f"model family must be 'gpt' or 'llama', got {family!r}")
    return mod, blocks, forward


def run_cases(rank: int, world: int, model: dict, batch: int, cases: list[Case], repeats: int,
              device: str = "cpu") -> list[dict]:
    """ltk.parallel.dist.spawn target: every case whose cp equals the world size, on this rank."""
    import torch.distributed as dist

    from ltk.bench.live_bytes import LiveBytes
    from ltk.parallel.context_parallel import CP_STATS, ContextParallel
    from ltk.parallel.timeline import Timeline
    from ltk.training.memory import ActivationPeak

    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    cuda = dev.type == "cuda"
    backend = "auto" if cuda else "torch"
    mod, blocks, forward = build_blocks({**model, "backend": backend}, dev)
    out = []
    for case in (c for c in cases if c.cp == world):
        cp = None if case.impl == "none" else ContextParallel(None, case.impl, case.layout, seq_len=case.T)
        g = torch.Generator().manual_seed(case.T)
        x = torch.randn(batch, case.T, model["n_embd"], generator=g).to(dev)
        dy = torch.randn(batch, case.T, model["n_embd"], generator=g).to(dev)  # a fixed upstream gradient
        pos = torch.arange(case.T, device=dev)
        if cp is not None:  # this rank's two chunks; padded rows get no gradient
            x, dy, pos = cp.shard(x, dim=1), cp.shard(dy, dim=1), cp.positions(case.T, dev)
        timer = AttentionTimer(cuda)

        def step():
            blocks.zero_grad(set_to_none=True)
            forward(x, pos).backward(dy)

        with _timed_kernels(mod, blocks, case, cp, timer):
            CP_STATS.reset()
            if cuda:
                torch.cuda.synchronize(dev)
                before = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            with ActivationPeak(blocks) as saved, LiveBytes() as live:
                step()
            live_peak = torch.cuda.max_memory_allocated(dev) - before if cuda else live.peak
            stats = CP_STATS.snapshot()
            steps, attn, cpu, rows, window = [], [], [], None, None
            if case.timed:
                with Timeline(dev, enabled=world > 1) as tl:
                    for i in range(repeats + 1):  # the first: warm-up
                        if world > 1:
                            dist.barrier()
                        timer.seconds = 0.0
                        t0, c0 = time.perf_counter(), time.thread_time()
                        tl.begin_step(i)
                        step()
                        if cuda:
                            torch.cuda.synchronize(dev)
                        tl.end_step()
                        if world > 1:
                            dist.barrier()  # the step is over when the slowest rank is
                        if i:
                            steps.append(time.perf_counter() - t0)
                            cpu.append(time.thread_time() - c0)
                            attn.append(timer.seconds)
                    rows = tl.flush()
                    window = [w[-1:] for w in tl.last_window] if rows else None
        out.append({**asdict(case), "rank": rank, "saved_peak": saved.peak, "live_peak": live_peak, "cp_stats": stats,
                    "step_s": statistics.median(steps) if steps else None,
                    "attn_s": statistics.median(attn) if attn else None,
                    "cpu_s": statistics.median(cpu) if cpu and not cuda else None,
                    "timeline": rows, "window": window})
    return out
