"""NaiveDDP and DDP (ltk/parallel/ddp.py) on 2 and 4 gloo processes against one process.

Each spawned group runs every check at once (spawning costs seconds, the checks milliseconds):
parity with `train_single` (losses per step and final parameters, 1e-5 relative) plain, with
gradient accumulation under no_sync, and with global-norm clipping; the bytes and the number of
all-reduces per step against parallel.cost; the broadcast of rank-dependent initializations;
the overlap (buckets launched while backward still runs); parameters some ranks leave unused;
and torch's own DistributedDataParallel on the same data.

The model is tiny_gpt without biases, trained at lr 5e-4. With biases no data-parallel run can
meet 1e-5: the key bias of attention has an identically zero gradient (q·(k_j + b) adds the same
q·b to every logit of a softmax row), so what reaches it is roundoff, whose sign depends on the
summation order, and AdamW turns that noise into ±lr steps (5e-4 relative after 5 steps even for
an exact average computed in one process). Without biases, AdamW still amplifies the roundoff of
near-cancelling gradient elements in proportion to lr: 1e-5 at lr 1e-2, 1e-6 to 5e-6 here. A
wrong average (sum, not mean) still moves the parameters by 1e-3 relative here, and the first
step's gradients and norm are compared directly, where AdamW's scale invariance cannot hide it.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ltk.parallel.cost import zero_comm_bytes
from ltk.parallel.ddp import DDP, NaiveDDP, assign_buckets
from ltk.parallel.dist import STATS, Comm, spawn
from ltk.parallel.reference import (
    dp_shard,
    lm_loss,
    make_optimizer,
    max_rel_error,
    synthetic_batches,
    tiny_gpt,
    train_single,
)

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 5, 8, 16, 96
SMALL_CAP_MB = 0.02  # ~20 KiB: tiny_gpt's ~110 KiB of gradients fall into several buckets
CLIP = 0.5  # below the gradient norm of every step (about 0.8), so clipping really scales
ENGINES = {"naive": NaiveDDP, "ddp": DDP}
TOL = 1e-5
LR = 5e-4
OPT = partial(make_optimizer, lr=LR)


def _model(seed: int = 0):
    return tiny_gpt(seed, bias=False)


def _batches():
    return synthetic_batches(STEPS, GLOBAL_BATCH, SEQ, VOCAB)


def _train(engine, rank, world, micro_batches=1, clip=0.0) -> dict:
    """The parallel twin of train_single: this rank's rows, no_sync on all micro-batches but the
    last; the norm is measured every step (clipped with `clip`). Returns local losses, norms,
    the first step's averaged gradients, per-step counters and the final state."""
    out = {"losses": [], "norms": [], "steps": [], "no_sync_calls": []}
    for x, y in _batches():
        x, y = dp_shard(x, rank, world), dp_shard(y, rank, world)
        STATS.reset()
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
            last = i == micro_batches - 1
            with nullcontext() if last else engine.no_sync():
                loss = lm_loss(engine, xm, ym) / micro_batches
                loss.backward()
            if not last:
                out["no_sync_calls"].append(sum(STATS.calls.values()))
            total += loss.item()
        out["norms"].append(engine.clip_grad_norm_(clip or math.inf))
        if "grads" not in out:
            out["grads"] = {engine.names[id(p)]: p.grad.clone() for p in engine.params}
        engine.step()
        engine.zero_grad()
        out["steps"].append(STATS.snapshot())
        out["losses"].append(total)
    out["state"] = engine.full_state_dict()
    out["optim"] = engine.optimizer_state_dict()
    return out


class _Branchy(torch.nn.Module):
    """`b` is used only when asked: rank 0 leaves it out, the others use it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x, use_b):
        h = self.a(x)
        return self.c(self.b(h) if use_b else h).sum()


def _unused_params(cls, rank, world) -> float:
    """Max |engine grad - mean over ranks of local grads| over two steps; the second after the
    optimizer set grads to None, so a stale bucket slot would show."""
    model, plain = _Branchy(), _Branchy()
    engine = cls(model, model.parameters(), make_optimizer, Comm(), **({"bucket_cap_mb": 1e-6} if cls is DDP else {}))
    err = 0.0
    for step in range(2):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * step + rank))
        plain.load_state_dict(model.state_dict())
        for q in plain.parameters():
            q.grad = torch.zeros_like(q)  # an unused parameter's local gradient is zero
        plain(x, rank > 0).backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            local = q.grad.clone()
            dist.all_reduce(local)  # uncounted: the expected value, not the engine's traffic
            q.grad = local / world
        engine(x, rank > 0).backward()
        engine.clip_grad_norm_(math.inf)  # NaiveDDP reduces here
        pairs = zip(model.parameters(), plain.parameters())
        err = max(err, max((p.grad - q.grad).abs().max().item() for p, q in pairs))
        engine.step()
        engine.optimizer.zero_grad(set_to_none=True)
    return err


def _worker(rank, world) -> dict:
    res = {}
    for name, cls in ENGINES.items():
        cap = {"bucket_cap_mb": SMALL_CAP_MB} if cls is DDP else {}
        for mode, kw in {"plain": {}, "accum": {"micro_batches": 2}, "clip": {"clip": CLIP}}.items():
            model = _model()
            # the contract's two forms of param_groups: dicts (weight decay as make_optimizer's) or a plain list
            groups = [{"params": list(model.parameters()), "weight_decay": 0.1}] if mode == "clip" \
                else model.parameters()
            engine = cls(model, groups, OPT, Comm(), **cap)
            res[name, mode] = _train(engine, rank, world, **kw)
            if cls is DDP and mode == "plain":
                res["ddp", "buckets"] = [[engine.names[id(p)] for p in ps] for ps in engine.buckets]
        # rank-dependent initialization: the engine must broadcast rank 0's parameters
        model = _model(seed=rank)
        res[name, "broadcast"] = cls(model, model.parameters(), OPT, Comm(), **cap).full_state_dict()
        res[name, "unused"] = _unused_params(cls, rank, world)

    # overlap: all-reduces already launched when each gradient becomes ready (engine hook runs first)
    model = _model()
    engine = DDP(model, model.parameters(), OPT, Comm(), bucket_cap_mb=SMALL_CAP_MB)
    launched = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _: launched.append(STATS.calls["all_reduce"]))
    x, y = _batches()[0]
    STATS.reset()
    lm_loss(engine, dp_shard(x, rank, world), dp_shard(y, rank, world)).backward()
    res["overlap"] = (launched, len(engine.buckets))

    # torch's DistributedDataParallel on the same data
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = OPT(ddp.parameters())
    losses = []
    for x, y in _batches():
        loss = lm_loss(ddp, dp_shard(x, rank, world), dp_shard(y, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    res["torch", "plain"] = {"losses": losses, "state": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return _convert(res, lambda t: t.numpy())


def _convert(x, fn):
    """Tensors go back to the parent as numpy arrays: a tensor put on the result queue lives in
    shared memory that dies with the rank that exits."""
    if isinstance(x, dict):
        return {k: _convert(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_convert(v, fn) for v in x)
    return fn(x) if isinstance(x, (torch.Tensor, np.ndarray)) else x


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _global_losses(per_rank: list[dict], key) -> list[float]:
    """Every rank's loss is the mean over its own equal share of rows: average over ranks."""
    return [sum(r[key]["losses"][s] for r in per_rank) / len(per_rank) for s in range(STEPS)]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The in-process parts use tiny tensors: a second thread only adds OpenMP contention (which
    made a 0.2 s test take 15 s on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def run(request):
    world = request.param
    return world, _convert(spawn(_worker, world, timeout_s=120), torch.from_numpy)


@pytest.fixture(scope="module")
def reference():
    settings = {"plain": {}, "accum": {"micro_batches": 2}, "clip": {"grad_clip": CLIP}}
    return {mode: (*train_single(_model(), _batches(), lr=LR, **kw), _first_step(**kw))
            for mode, kw in settings.items()}


def _first_step(micro_batches=1, grad_clip=0.0):
    """One process: the first step's gradients (after clipping) and global norm, which AdamW's
    invariance to the gradient's scale cannot hide."""
    model = _model()
    x, y = _batches()[0]
    for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        (lm_loss(model, xm, ym) / micro_batches).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf).item()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, norm


@pytest.mark.parametrize("engine", ["naive", "ddp"])
@pytest.mark.parametrize("mode", ["plain", "accum", "clip"])
def test_parity_with_single_process(run, reference, engine, mode):
    world, per_rank = run
    losses, params, (grads, norm) = reference[mode]
    got = per_rank[0][engine, mode]
    assert _rel(_global_losses(per_rank, (engine, mode)), losses) <= TOL
    assert max_rel_error(got["state"], params) <= TOL
    assert max_rel_error(got["grads"], grads) <= TOL
    assert abs(got["norms"][0] - norm) <= TOL * norm
    for r in per_rank[1:]:  # replicas stay identical, optimizer states and norms too
        for key in ("state", "optim", "norms"):
            assert _same(r[engine, mode][key], got[key]), key
    if mode == "clip":
        assert min(got["norms"]) > CLIP, "clipping never scaled: the test would not see a wrong norm"


@pytest.mark.parametrize("engine", ["naive", "ddp"])
@pytest.mark.parametrize("mode", ["plain", "accum", "clip"])
def test_bytes_and_calls_per_step(run, engine, mode):
    world, per_rank = run
    model = _model()
    num_params = sum(p.numel() for p in model.parameters())
    expected_calls = len(per_rank[0]["ddp", "buckets"]) if engine == "ddp" else len(list(model.parameters()))
    for r in per_rank:
        for snap in r[engine, mode]["steps"]:
            assert snap["payload_bytes"] == zero_comm_bytes(num_params, stage=0)
            assert snap["calls"] == {"all_reduce": expected_calls}
        assert r[engine, mode]["no_sync_calls"] == ([0] * STEPS if mode == "accum" else [])


def test_buckets_in_reverse_parameter_order(run):
    _, per_rank = run
    buckets = per_rank[0]["ddp", "buckets"]
    names = [n for n, _ in _model().named_parameters()]
    assert len(buckets) > 2
    assert [n for b in buckets for n in b] == names[::-1]
    assert all(r["ddp", "buckets"] == buckets for r in per_rank)


def test_rank_dependent_init_is_broadcast(run):
    _, per_rank = run
    want = {n: p.detach() for n, p in _model(seed=0).named_parameters()}
    assert not _same(_model(seed=1).state_dict(), _model(seed=0).state_dict())
    for r in per_rank:
        for engine in ENGINES:
            assert _same(r[engine, "broadcast"], want)


def test_all_reduces_overlap_backward(run):
    _, per_rank = run
    for r in per_rank:
        launched, buckets = r["overlap"]
        assert launched[-1] == buckets
        assert launched[-2] >= 1, f"no bucket was in flight before the last gradient: {launched}"


@pytest.mark.parametrize("engine", ["naive", "ddp"])
def test_parameters_unused_on_some_ranks(run, engine):
    _, per_rank = run
    assert max(r[engine, "unused"] for r in per_rank) <= 1e-6


def test_matches_torch_distributed_data_parallel(run):
    _, per_rank = run
    for r in per_rank:
        assert _rel(r["ddp", "plain"]["losses"], r["torch", "plain"]["losses"]) <= TOL
        assert max_rel_error(r["ddp", "plain"]["state"], r["torch", "plain"]["state"]) <= TOL


# -- one process (a group of one): settings and misuse fail with a clear message ----------------
def test_assign_buckets_caps_and_dtypes():
    ps = [torch.zeros(n) for n in (10, 30, 5, 5, 100, 3)] + [torch.zeros(4, dtype=torch.float64)]
    got = assign_buckets(ps, cap_bytes=80, first_cap_bytes=40)  # fp32: 4 bytes an element
    assert [[p.numel() for p in b] for b in got] == [[10], [30], [5, 5, 100], [3], [4]]


def test_misuse_is_reported():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="not a trainable parameter"):
        DDP(model, [torch.nn.Parameter(torch.zeros(2))], make_optimizer, Comm())
    with pytest.raises(ValueError, match="repeats a parameter"):
        DDP(model, [{"params": [model.wte.weight]}, {"params": [model.wte.weight]}], make_optimizer, Comm())
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DDP(model, model.parameters(), make_optimizer, Comm(), bucket_cap_mb=0)
    engine = DDP(model, model.parameters(), make_optimizer, Comm())
    with pytest.raises(ValueError, match="max_norm"):
        engine.clip_grad_norm_(0.0)
    x, y = _batches()[0]
    with engine.no_sync():
        lm_loss(engine, x, y).backward()
    with pytest.raises(RuntimeError, match="inside no_sync"):
        engine.step()


def test_optimizer_state_round_trip():
    """Two steps, save, a fresh engine loads and runs three more: the same as five in one go."""
    want_losses, want = train_single(tiny_gpt(), _batches())
    model = tiny_gpt()
    engine = DDP(model, model.parameters(), make_optimizer, Comm())
    for x, y in _batches()[:2]:
        lm_loss(engine, x, y).backward()
        engine.step()
        engine.zero_grad()
    saved, weights = engine.optimizer_state_dict(), engine.full_state_dict()
    model = tiny_gpt(seed=5)
    model.load_state_dict(weights, strict=False)
    engine = DDP(model, model.parameters(), make_optimizer, Comm())
    engine.load_optimizer_state_dict(saved)
    losses = []
    for x, y in _batches()[2:]:
        loss = lm_loss(engine, x, y)
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    assert _rel(losses, want_losses[2:]) <= TOL
    assert max_rel_error(engine.full_state_dict(), want) <= TOL


def test_remove_hooks_detaches_the_engine():
    model = _model()
    first = DDP(model, model.parameters(), OPT, Comm())
    first.remove_hooks()
    second = DDP(model, model.parameters(), OPT, Comm())
    lm_loss(second, *_batches()[0]).backward()
    assert all(not b.any() for b in first.buffers), "a removed engine still saw gradients"
    assert all(b.any() for b in second.buffers)
