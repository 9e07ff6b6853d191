"""ZeRO-1/2/3 (ltk/parallel/zero.py, ltk/parallel/zero3.py) on 2 and 4 gloo processes against the
single-process yardstick (ltk/parallel/reference.py), the cost model (ltk/parallel/cost.py), PyTorch's
FSDP2 and, where installed, DeepSpeed.

Starting a process costs seconds (each one imports torch), so one spawned run per world size
(`_run`) does every check at that size and returns plain numbers; the tests assert on them.

Learning rate: Adam maps a gradient element to about ±lr whatever its size, so an element whose
gradient is a near-cancelling sum (a GELU unit almost off) turns the summation-order noise of
*any* data-parallel split into a visible difference: at lr 1e-2 even a one-process average of
two half-batch gradients differs from train_single by 7e-5 relative. At LR = 3e-4 that floor is
~3e-6 while the parameters still move by ~5% of their largest entry in 5 steps, so a wrong update
fails by orders of magnitude. Scale bugs (Adam ignores a constant factor) are caught by the
clipping norms and the optimizer's first moment, which are compared too.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from ltk.parallel import cost
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
from ltk.parallel.zero import ZeroEngine
from ltk.parallel.zero3 import Zero3Engine

LR, CLIP, STEPS = 3e-4, 0.5, 5
UNEVEN = dict(n_embd=33, n_head=3, bias=False)  # Ψ = 29,997 (odd): buffers pad at 2 and 4 ranks
EVEN = dict(bias=False)  # Ψ = 28,320: every param group and unit divides by 4
VARIANTS = {"plain": (1, 0.0), "micro2": (2, 0.0), "clip": (1, CLIP)}  # name -> (micro_batches, clip)
BATCHES = synthetic_batches(STEPS + 1, 8, 16, 96)
OVERFIT = BATCHES[:1] * 8  # one batch repeated: the loss must fall


def _engine(stage, model, groups, dtype="fp32", lr=LR):
    factory = lambda gs: make_optimizer(gs, lr)  # noqa: E731
    if stage == 3:
        return Zero3Engine(model, groups, factory, Comm(), compute_dtype=dtype)
    return ZeroEngine(model, groups, factory, Comm(), stage=stage, compute_dtype=dtype)


def _train(eng, rank, world, batches, mb=1, clip=0.0):
    """Per-step mean losses, pre-clip norms, payload of the last step by collective."""
    losses, norms, payload = [], [], {}
    for x, y in batches:
        x, y = dp_shard(x, rank, world), dp_shard(y, rank, world)
        STATS.reset()
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(zip(x.chunk(mb), y.chunk(mb))):
            with eng.no_sync() if i < mb - 1 else contextlib.nullcontext():
                loss = lm_loss(eng, xm, ym) / mb
                loss.backward()
            total += loss.detach().float()
        if clip:
            norms.append(eng.clip_grad_norm_(clip))
        eng.step()
        eng.zero_grad()
        payload = dict(STATS.payload)
        dist.all_reduce(total)  # uncounted: not the engine's traffic
        losses.append(total.item() / world)
    return losses, norms, payload


def _np(obj):
    if torch.is_tensor(obj):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: _np(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_np(v) for v in obj]
    return obj


def _torch(obj):
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and not torch.is_tensor(obj):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_torch(v) for v in obj]
    return obj


def _run(rank, world, ckpts, with_deepspeed):
    res = {"parity": {}, "even": {}, "bf16": {}, "resume": {}, "ckpt": {}}
    for stage in (1, 2, 3):
        for name, (mb, clip) in VARIANTS.items():
            model = tiny_gpt(**UNEVEN)
            eng = _engine(stage, model, list(model.parameters()))
            losses, norms, payload = _train(eng, rank, world, BATCHES[:STEPS], mb, clip)
            res["parity"][stage, name] = dict(losses=losses, norms=norms, payload=payload, mem=eng.state_bytes(),
                                              padded=eng.padded_numels(), params=_np(eng.full_state_dict()))
        model = tiny_gpt(**EVEN)  # two param groups, weight decay 0.1 / 0.0
        eng = _engine(stage, model, model.param_groups(0.1))
        losses, norms, payload = _train(eng, rank, world, BATCHES[:STEPS], 1, math.inf)
        res["even"][stage] = dict(losses=losses, norms=norms, payload=payload, mem=eng.state_bytes(),
                                  padded=eng.padded_numels(), params=_np(eng.full_state_dict()),
                                  opt=_np(eng.optimizer_state_dict()),
                                  wd=[g["weight_decay"] for g in eng.optimizer.param_groups],
                                  freed=all(p.untyped_storage().nbytes() == 0 for p in model.parameters()))
        model = tiny_gpt(**UNEVEN)
        eng = _engine(stage, model, list(model.parameters()), dtype="bf16", lr=1e-2)
        losses, _, payload = _train(eng, rank, world, OVERFIT)
        res["bf16"][stage] = dict(losses=losses, payload=payload, mem=eng.state_bytes(), padded=eng.padded_numels())
        # resume: 3 steps on 2 ranks -> checkpoint -> 3 more steps on 2 ranks, or on 4 from the checkpoint
        if ckpts is None:
            model = tiny_gpt(**UNEVEN)
            eng = _engine(stage, model, list(model.parameters()))
            _train(eng, rank, world, BATCHES[:3])
            res["ckpt"][stage] = (_np(eng.full_state_dict()), _np(eng.optimizer_state_dict()))
            res["resume"][stage] = _train(eng, rank, world, BATCHES[3:6])[0]
        else:
            for src in {stage, 1}:  # the same stage, and every stage from the ZeRO-1 checkpoint
                model = tiny_gpt(seed=1, **UNEVEN)  # other initial weights: the checkpoint must win
                model.load_state_dict(_torch(ckpts[src][0]))
                eng = _engine(stage, model, list(model.parameters()))
                eng.load_optimizer_state_dict(_torch(ckpts[src][1]))
                res["resume"][stage, src] = _train(eng, rank, world, BATCHES[3:6])[0]
    res["fsdp2"] = _fsdp2(rank, world)
    if with_deepspeed:
        res["deepspeed"] = _deepspeed(rank, world)
    return res


def _fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_gpt(**UNEVEN)
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.parameters(), LR)
    losses = []
    for x, y in BATCHES[:STEPS]:
        loss = lm_loss(model, dp_shard(x, rank, world), dp_shard(y, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def _deepspeed(rank, world):
    """DeepSpeed ZeRO 1/2/3 with the same torch AdamW, or the reason it could not run."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # its CPU accelerator talks gloo
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"import deepspeed failed: {e!r}"
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)
    out = {}
    for stage in (1, 2, 3):
        model = tiny_gpt(**UNEVEN)
        cfg = {"train_micro_batch_size_per_gpu": BATCHES[0][0].shape[0] // world, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
               "steps_per_print": 10 ** 9}
        try:  # a failure here is the same on every rank (config, accelerator): report it, skip
            eng, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model.parameters(), LR), config=cfg)
        except Exception as e:  # noqa: BLE001
            return f"deepspeed.initialize failed: {e!r}"
        losses = []
        for x, y in BATCHES[:STEPS]:
            loss = lm_loss(eng, dp_shard(x, rank, world), dp_shard(y, rank, world))
            eng.backward(loss)
            eng.step()
            t = loss.detach().clone().float()
            dist.all_reduce(t)
            losses.append(t.item() / world)
        out[stage] = losses
    return out


# -- the spawned runs and the single-process references -----------------------------------------
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def runs():
    two = spawn(_run, 2, None, HAVE_DEEPSPEED, timeout_s=240)
    four = spawn(_run, 4, two[0]["ckpt"], False, timeout_s=240)
    return {2: two, 4: four}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The references are tiny: one thread avoids OpenMP spinning against the spawned ranks."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def _reference(n_steps, lr=LR, mb=1, clip=0.0, overfit=False, dp=1):
    """train_single on the uneven model (cached: several tests share each run); dp: the gradient
    summed in the order of dp ranks (train_single's docstring)."""
    return train_single(tiny_gpt(**UNEVEN), OVERFIT if overfit else BATCHES[:n_steps], lr, mb, clip, dp=dp)


@functools.lru_cache(maxsize=None)
def _single(kw_items, n_steps=STEPS, lr=LR, grouped=False, clip=0.0):
    """train_single with decay groups and the optimizer state by name (the grouped yardstick)."""
    model = tiny_gpt(**dict(kw_items))
    opt = make_optimizer(model.param_groups(0.1) if grouped else model.parameters(), lr)
    names = {id(p): n for n, p in model.named_parameters()}
    losses, norms = [], []
    for x, y in BATCHES[:n_steps]:
        loss = lm_loss(model, x, y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state = {names[id(p)]: s for p, s in opt.state.items()}
    return losses, {n: p.detach() for n, p in model.named_parameters()}, norms, state


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


WORLDS, STAGES = (2, 4), (1, 2, 3)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", WORLDS)
def test_losses_and_params_equal_single_process(runs, world, stage, variant):
    mb, clip = VARIANTS[variant]
    ref_losses, ref_params = _reference(STEPS, LR, mb, clip, dp=world)
    got = runs[world][0]["parity"][stage, variant]
    assert _rel(got["losses"], ref_losses) < 1e-5
    assert max_rel_error({k: _torch(got["params"][k]) for k in ref_params}, ref_params) < 1e-5
    if clip:
        ref_norms = _single(tuple(UNEVEN.items()), clip=clip)[2]
        assert min(got["norms"]) > clip  # clipping was active at every step
        assert _rel(got["norms"], ref_norms) < 1e-5


@pytest.mark.parametrize("world", WORLDS)
def test_full_state_dict_is_the_single_process_state_dict(runs, world):
    first, last = runs[world][0]["parity"][3, "plain"]["params"], runs[world][-1]["parity"][3, "plain"]["params"]
    assert list(first) == list(tiny_gpt(**UNEVEN).state_dict())  # every name, tied head included
    assert all((first[k] == last[k]).all() for k in first)  # the same on every rank
    assert (first["lm_head.weight"] == first["wte.weight"]).all()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", WORLDS)
def test_comm_bytes_equal_cost_model(runs, world, stage):
    par, even = runs[world][0]["parity"], runs[world][0]["even"][stage]
    psi = sum(p.numel() for p in tiny_gpt(**EVEN).parameters())
    assert sum(even["padded"]) == psi  # nothing to pad: the formula at Ψ itself
    assert even["payload"] == cost.zero_comm_bytes(psi, stage) | {"all_reduce": 4}  # + the norm's scalar
    padded = sum(par[stage, "plain"]["padded"])  # Ψ̃ = Σ_b N·ceil(Ψ_b/N)
    assert padded > sum(p.numel() for p in tiny_gpt(**UNEVEN).parameters())
    assert par[stage, "plain"]["payload"] == cost.zero_comm_bytes(padded, stage, 1)
    assert par[stage, "micro2"]["payload"] == cost.zero_comm_bytes(padded, stage, 2)
    assert par[stage, "clip"]["payload"] == cost.zero_comm_bytes(padded, stage, 1) | {"all_reduce": 4}
    bf16 = runs[world][0]["bf16"][stage]
    assert bf16["payload"] == cost.zero_comm_bytes(padded, stage, 1, cost.Precision.of("bf16"))


def _formula(padded, world, stage, prec=cost.Precision()):
    per = [cost.model_state_bytes(n, world, stage, prec) for n in padded]
    return {k: sum(d[k] for d in per) for k in per[0]}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", WORLDS)
def test_model_state_memory_equals_cost_model(runs, world, stage):
    out = runs[world][0]
    psi = sum(p.numel() for p in tiny_gpt(**EVEN).parameters())
    assert out["even"][stage]["mem"] == cost.model_state_bytes(psi, world, stage, cost.Precision(4, 4, 8))
    assert out["even"][stage]["freed"] == (stage == 3)  # ZeRO-3 keeps no full parameter at rest
    plain = out["parity"][stage, "plain"]
    assert plain["mem"] == _formula(plain["padded"], world, stage)
    bf16 = out["bf16"][stage]
    assert bf16["mem"] == _formula(bf16["padded"], world, stage, cost.Precision.of("bf16"))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", WORLDS)
def test_param_groups_and_consolidated_optimizer_state(runs, world, stage):
    losses, params, norms, state = _single(tuple(EVEN.items()), grouped=True)
    got = runs[world][0]["even"][stage]
    assert got["wd"] == [0.1, 0.0]
    assert _rel(got["losses"], losses) < 1e-5 and _rel(got["norms"], norms) < 1e-5
    assert max_rel_error({k: _torch(got["params"][k]) for k in params}, params) < 1e-5
    opt = got["opt"]
    assert set(opt["state"]) == set(state) and [len(g["params"]) for g in opt["param_groups"]] == [
        len(g["params"]) for g in tiny_gpt(**EVEN).param_groups(0.1)]
    for key in ("exp_avg", "exp_avg_sq"):
        assert max_rel_error({n: _torch(s[key]) for n, s in opt["state"].items()},
                             {n: s[key] for n, s in state.items()}) < 1e-4  # m, v: scale-sensitive
    assert all(float(s["step"]) == STEPS for s in opt["state"].values())


@pytest.mark.parametrize("stage", STAGES)
def test_resume_on_another_world_size(runs, stage):
    continued = runs[2][0]["resume"][stage]
    ref = _reference(6)[0][3:]
    assert _rel(continued, ref) < 1e-5
    for src in {stage, 1}:
        assert _rel(runs[4][0]["resume"][stage, src], continued) < 1e-5


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", WORLDS)
def test_bf16_trains_close_to_fp32(runs, world, stage):
    ref = _reference(len(OVERFIT), 1e-2, overfit=True)[0]
    got = runs[world][0]["bf16"][stage]["losses"]
    assert got[-1] < got[0] - 1.0  # 4.58 -> ~3.1 in fp32
    assert _rel(got, ref) < 0.03


@pytest.mark.parametrize("world", WORLDS)
def test_zero3_matches_fsdp2(runs, world):
    assert _rel(runs[world][0]["parity"][3, "plain"]["losses"], runs[world][0]["fsdp2"]) < 1e-5


@pytest.mark.parametrize("stage", STAGES)
def test_matches_deepspeed(runs, stage):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install deepspeed; it runs here with DS_ACCELERATOR=cpu)")
    ds = runs[2][0]["deepspeed"]
    if isinstance(ds, str):
        pytest.skip(ds)
    assert _rel(runs[2][0]["parity"][stage, "plain"]["losses"], ds[stage]) < 1e-5


# -- one process: the engine contract and its errors ---------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("stage", STAGES)
def test_one_process_equals_train_single(stage, checkpointing):
    model = tiny_gpt(**UNEVEN)
    model.activation_checkpointing = checkpointing  # ZeRO-3: blocks recomputed inside their backward
    eng = _engine(stage, model, list(model.parameters()))  # no process group: Comm of size 1
    losses = []
    for x, y in BATCHES[:3]:
        loss = lm_loss(eng, x, y)
        loss.backward()
        eng.step()
        eng.zero_grad()
        losses.append(loss.item())
    ref_losses, ref_params = _reference(3)
    assert _rel(losses, ref_losses) < 1e-6
    sd = eng.full_state_dict()
    assert max_rel_error({k: sd[k] for k in ref_params}, ref_params) < 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero3_holds_at_most_three_units_in_full(checkpointing):
    """root + the running block + the prefetched one, in forward and in backward; a block stays
    gathered until its last gradient (also when checkpointing recomputes it in its backward)."""
    model = tiny_gpt(n_layer=4, **UNEVEN)
    model.activation_checkpointing = checkpointing
    eng = _engine(3, model, list(model.parameters()))
    units = {id(u.module): u for u in eng.units}
    counts, own = [], []

    def gathered(u):
        return u.full.untyped_storage().nbytes() > 0

    def probe(u, *_):
        counts.append(sum(gathered(v) for v in eng.units))
        own.append(gathered(u))
    for block in model.h:
        block.register_forward_pre_hook(functools.partial(probe, units[id(block)]))
        for p in block.parameters():  # runs after the engine's hook, which frees at the last grad
            p.register_post_accumulate_grad_hook(functools.partial(probe, units[id(block)]))
    x, y = BATCHES[0]
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute runs the whole block
        lm_loss(eng, x, y).backward()
    per_block = sum(1 for _ in model.h[0].parameters())
    assert len(eng.units) == 5 and len(counts) == 4 * (1 + (1 if checkpointing else 0) + per_block)
    assert max(counts) == 3 and counts[0] == 3  # block 0: + root + the prefetched block 1
    assert own.count(False) == 4 and own.count(True) == len(own) - 4  # freed only after its last grad
    assert sum(u.full.untyped_storage().nbytes() for u in eng.units) == 0


def test_zero3_weight_tied_across_units_belongs_to_the_root():
    model = tiny_gpt(**UNEVEN)
    eng = _engine(3, model, list(model.parameters()), lr=1e-2)
    model2 = tiny_gpt(**UNEVEN)  # lm_head as a unit too: its weight is also wte's, used by the root
    eng2 = Zero3Engine(model2, list(model2.parameters()), lambda g: make_optimizer(g, 1e-2), Comm(),
                       units=[*model2.h, model2.lm_head])
    assert [u.module for u in eng2.units] == [*model2.h, model2] and "wte.weight" in eng2.units[-1].layout.names
    for e in (eng, eng2):
        for x, y in OVERFIT[:3]:
            lm_loss(e, x, y).backward()
            e.step()
            e.zero_grad()
    a, b = eng.full_state_dict(), eng2.full_state_dict()
    assert max_rel_error(a, b) < 1e-6


@pytest.mark.parametrize("stage", STAGES)
def test_empty_param_group_keeps_its_place(stage):
    model = tiny_gpt(**UNEVEN)
    groups = [{"params": [], "weight_decay": 0.0}, {"params": list(model.parameters()), "weight_decay": 0.1}]
    eng = _engine(stage, model, groups)
    lm_loss(eng, *BATCHES[0]).backward()
    eng.step()
    sd = eng.optimizer_state_dict()
    assert [g["weight_decay"] for g in eng.optimizer.param_groups] == [0.0, 0.1]
    assert [len(g["params"]) for g in sd["param_groups"]] == [0, len(list(model.parameters()))]
    eng.load_optimizer_state_dict(sd)


def test_bad_input_is_named():
    model = tiny_gpt(**UNEVEN)
    with pytest.raises(ValueError, match="stage 1 or 2"):
        ZeroEngine(model, list(model.parameters()), make_optimizer, Comm(), stage=3)
    with pytest.raises(ValueError, match="compute_dtype"):
        ZeroEngine(model, list(model.parameters()), make_optimizer, Comm(), compute_dtype="fp8")
    with pytest.raises(ValueError, match="in no param group"):
        ZeroEngine(model, list(model.parameters())[1:], make_optimizer, Comm())
    with pytest.raises(ValueError, match="not a submodule"):
        Zero3Engine(model, list(model.parameters()), make_optimizer, Comm(), units=[torch.nn.Linear(2, 2)])
    eng = ZeroEngine(model, list(model.parameters()), make_optimizer, Comm())
    with pytest.raises(ValueError, match="max_norm must be positive"):
        eng.clip_grad_norm_(0.0)
    sd = eng.optimizer_state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][1:]
    with pytest.raises(ValueError, match="names differ"):
        eng.load_optimizer_state_dict(sd)
