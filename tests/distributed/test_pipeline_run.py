"""PipelineRun (ltk/parallel/pipeline_run.py): pipeline x data parallelism as the training loop uses
it, equal to one process. Every layout trains the same 5 global batches of 8 rows, which always
make 4 micro-batches of 2 rows (m per pipeline x dp pipelines), with AdamW in two groups (decay
0.1 on matrices, 0 on vectors), a learning rate the loop sets each step, and clipping at 0.7 (the norms are 0.6-0.9).

The model has no biases: a key bias has an exactly-zero true gradient (softmax removes it), and
Adam turns the rounding noise there into ±lr steps, which any change of summation order would
show (tests/distributed/test_pipeline.py, test_key_bias_has_no_gradient). The single-process
reference runs here on one thread, as the spawned ranks do: a matmul split over two threads
rounds differently (one thread in this process gives bit for bit what a spawned process gives,
without the seconds a spawn costs).
"""
from __future__ import annotations

import pytest
import torch

from ltk.parallel.cost import pp_comm_bytes, zero_comm_bytes
from ltk.parallel.dist import STATS, spawn
from ltk.parallel.pipeline import rank_stages
from ltk.parallel.pipeline_run import PipelineRun
from ltk.parallel.reference import lm_loss, synthetic_batches, tiny_gpt
from ltk.training.evaluate import evaluate
from ltk.training.objectives import CausalLM

STEPS, ROWS, MICRO, SEQ, VOCAB, N_LAYER, CLIP, TOL = 5, 8, 4, 16, 96, 4, 0.7, 1e-5
SAVE_AT = 3  # the resume test saves after this many steps
# name -> (pp, schedule, virtual, micro-batches per pipeline); by world size
LAYOUTS = {2: {"pp2-1f1b": (2, "1f1b", 1, 4), "pp2-interleaved": (2, "interleaved", 2, 4)},
           4: {"pp2xdp2-gpipe": (2, "gpipe", 1, 2), "pp4-1f1b": (4, "1f1b", 1, 4)}}
RESUME_FROM, RESUME_TO = ("pp2xdp2-gpipe", 4), ("pp2-interleaved", 2)


def _model():
    return tiny_gpt(0, n_layer=N_LAYER, bias=False)


def _groups(model):
    return model.param_groups(0.1)


def _adamw(groups):
    return torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _lr(step: int) -> float:
    return 1e-2 * (1 - 0.1 * step)


def _batches():
    return synthetic_batches(STEPS, ROWS, SEQ, VOCAB)


def _single(rank: int, world: int) -> dict:
    """One process: micro-batches accumulated with loss / MICRO, the same groups and clipping."""
    model = _model()
    opt = _adamw(_groups(model))
    names = {id(p): n for n, p in model.named_parameters()}
    out = {"losses": [], "norms": []}
    for step, (x, y) in enumerate(_batches()):
        for g in opt.param_groups:
            g["lr"] = _lr(step)
        total = 0.0
        for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO)):
            loss = lm_loss(model, xm, ym) / MICRO
            loss.backward()
            total += loss.item()
        out["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["losses"].append(total)
        if step + 1 == SAVE_AT:
            out["optim"] = {"state": {names[id(p)]: {k: v.clone() for k, v in opt.state[p].items()}
                                      for g in opt.param_groups for p in g["params"]},
                            "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                              "params": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]}
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batches()[0]
    with torch.no_grad():
        out["eval_loss"] = lm_loss(model, x, y).item()
    return out


def _train(run: PipelineRun, batches, first_step: int, out: dict) -> None:
    for step, (x, y) in enumerate(batches, first_step):
        for g in run.optimizer.param_groups:
            g["lr"] = _lr(step)
        STATS.reset()
        out["losses"].append(run.forward_backward(run.rows(x), run.rows(y)))
        out["norms"].append(run.clip_grad_norm_(CLIP))
        out["stats"].append(STATS.snapshot())
        run.step()
        run.zero_grad()
        if step + 1 == SAVE_AT:
            out["saved"] = (run.full_state_dict(), run.optimizer_state_dict())


def _worker(rank: int, world: int, resume: tuple | None) -> dict:
    out = {}
    for name, (pp, schedule, v, m) in LAYOUTS[world].items():
        run = PipelineRun(_model(), _groups, _adamw, pp=pp, schedule=schedule, virtual=v, micro_batches=m)
        res = {"losses": [], "norms": [], "stats": [], "pp_rank": run.pp_rank, "dp": run.dp_size,
               "numel": sum(p.numel() for c in rank_stages(_model(), run.pp_rank, pp, v) for p in c.parameters())}
        _train(run, _batches(), 0, res)
        res["state"] = run.full_state_dict()
        res["timings"] = run.last_timings
        # evaluation through the stages (no rank builds the whole model), as the trainer runs it
        share = run.eval_share(CausalLM(0, 0))
        batches = [_batches()[0]]
        mine = [batches[i] for i in share.mine(len(batches))]
        pad = [batches[0]] * (share.calls(len(batches)) - len(mine))
        ones = torch.ones(_model().config.vocab_size, dtype=torch.long)
        res["eval_loss"] = evaluate(share.model, mine, ones, torch.device("cpu"), all_reduce=share.all_reduce,
                                    eval_sums=share.eval_sums, discard=pad)["val_loss"]
        out[name] = res
    if resume is not None:  # another layout, from a by-name checkpoint
        state, optim = resume
        (pp, schedule, v, m) = LAYOUTS[world][RESUME_TO[0]]
        model = _model()
        model.load_state_dict(state)
        run = PipelineRun(model, _groups, _adamw, pp=pp, schedule=schedule, virtual=v, micro_batches=m)
        run.load_optimizer_state_dict(optim)
        res = {"losses": [], "norms": [], "stats": []}
        _train(run, _batches()[SAVE_AT:], SAVE_AT, res)
        res["state"] = run.full_state_dict()
        out["resumed"] = res
    return out


@pytest.fixture(scope="module")
def runs():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _single(0, 1)
    finally:
        torch.set_num_threads(old)
    four = spawn(_worker, 4, None, timeout_s=120)
    saved = four[0][RESUME_FROM[0]]["saved"]
    two = spawn(_worker, 2, saved, timeout_s=120)
    return ref, {2: two, 4: four}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ‖a − b‖ / ‖b‖ (names must match)."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in a)


def _rel_list(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _layouts():
    return [(world, name) for world in LAYOUTS for name in LAYOUTS[world]]


@pytest.mark.parametrize("world, name", _layouts())
def test_equal_to_one_process(runs, world, name):
    ref, per_world = runs
    per_rank = [r[name] for r in per_world[world]]
    assert min(ref["norms"]) < CLIP < max(ref["norms"])  # clipped in some steps, not in others
    for res in per_rank:  # the loss and the norm: the same float on every rank
        assert res["losses"] == per_rank[0]["losses"] and res["norms"] == per_rank[0]["norms"]
        assert res["state"].keys() == ref["state"].keys()
        assert torch.equal(res["state"]["lm_head.weight"], res["state"]["wte.weight"])
        for k, t in res["state"].items():  # every rank (dp replicas too) sees the same weights
            assert torch.equal(t, per_rank[0]["state"][k]), (name, k)
    assert _rel_list(per_rank[0]["losses"], ref["losses"]) <= TOL, (per_rank[0]["losses"], ref["losses"])
    assert _rel_list(per_rank[0]["norms"], ref["norms"]) <= TOL, (per_rank[0]["norms"], ref["norms"])
    assert _rel(per_rank[0]["state"], ref["state"]) <= TOL, name
    assert abs(per_rank[0]["eval_loss"] - ref["eval_loss"]) <= TOL * ref["eval_loss"]


def test_optimizer_state_by_name_equals_one_process(runs):
    ref, per_world = runs
    state, optim = per_world[RESUME_FROM[1]][0][RESUME_FROM[0]]["saved"]
    want = ref["optim"]
    assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in want["param_groups"]]
    for g, w in zip(optim["param_groups"], want["param_groups"]):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in w.items() if k != "params"}
    assert optim["state"].keys() == want["state"].keys() and "lm_head.weight" not in optim["state"]
    for n, st in optim["state"].items():
        assert st["step"].item() == want["state"][n]["step"].item() == SAVE_AT
    for key in ("exp_avg", "exp_avg_sq"):
        got = {n: st[key] for n, st in optim["state"].items()}
        assert _rel(got, {n: st[key] for n, st in want["state"].items()}) <= TOL, key


def test_resume_across_layouts(runs):
    """pp=2 x dp=2 GPipe saved after 3 steps, resumed as pp=2 interleaved (v=2) on 2 ranks:
    steps 4 and 5 as one process's."""
    ref, per_world = runs
    res = per_world[RESUME_TO[1]][-1]["resumed"]
    assert _rel_list(res["losses"], ref["losses"][SAVE_AT:]) <= TOL, (res["losses"], ref["losses"])
    assert _rel_list(res["norms"], ref["norms"][SAVE_AT:]) <= TOL
    assert _rel(res["state"], ref["state"]) <= TOL


@pytest.mark.parametrize("world, name", _layouts())
def test_counted_bytes_equal_the_cost_model(runs, world, name):
    """Per rank and step: the pipeline's p2p and tied all-reduce (cost.pp_comm_bytes), one
    all-reduce of the rank's gradients over dp (cost.zero_comm_bytes, stage 0), and the scalars:
    the loss (fp64) broadcast in the pipeline and averaged over dp, the squared norm (fp32)
    all-reduced in the pipeline."""
    _, per_world = runs
    pp, _, v, m = LAYOUTS[world][name]
    cfg = _model().config
    pipe = pp_comm_bytes(pp, m, ROWS // (world // pp) // m, SEQ, cfg.n_embd, v, 4, vocab=VOCAB)
    for r, res in enumerate(r[name] for r in per_world[world]):
        s, dp = res["pp_rank"], res["dp"]
        assert dp == world // pp and s == r // dp
        dp_bytes = zero_comm_bytes(res["numel"], 0)["all_reduce"] if dp > 1 else 0
        want_ar = pipe["per_rank_all_reduce"][s] + dp_bytes + (8 if dp > 1 else 0) + (4 if pp > 1 else 0)
        want_ar_calls = (pipe["per_rank_all_reduce"][s] > 0) + 2 * (dp > 1) + (pp > 1)
        for snap in res["stats"]:
            pay, calls = snap["payload_bytes"], snap["calls"]
            assert pay.get("send", 0) == pay.get("recv", 0) == pipe["per_rank_send"][s], (name, r)
            assert pay.get("all_reduce", 0) == want_ar, (name, r, pay)
            assert calls.get("all_reduce", 0) == want_ar_calls, (name, r, calls)
            assert pay.get("broadcast", 0) == (8 if pp > 1 else 0)
            assert set(pay) <= {"send", "recv", "all_reduce", "broadcast"}


def test_timings_are_recorded(runs):
    _, per_world = runs
    for res in per_world[4]:
        tm = res["pp4-1f1b"]["timings"]
        assert tm.forward > 0 and tm.backward > 0 and min(tm.wait, tm.other) >= 0


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="GPT"):
        PipelineRun(torch.nn.Linear(2, 2), _groups, _adamw, pp=1, micro_batches=1)
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        PipelineRun(_model(), _groups, _adamw, pp=2, micro_batches=2)
    with pytest.raises(ValueError, match="not a multiple of pp=2"):
        PipelineRun(_model(), _groups, _adamw, pp=2, schedule="interleaved", virtual=2, micro_batches=3)
    with pytest.raises(ValueError, match="in no param group"):
        PipelineRun(_model(), lambda m: _groups(m)[:1], _adamw, pp=1, micro_batches=2)
    run = PipelineRun(_model(), _groups, _adamw, pp=1, micro_batches=3)
    x = torch.zeros(4, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match="4 rows .* do not split into 3"):
        run.forward_backward(x, x)
