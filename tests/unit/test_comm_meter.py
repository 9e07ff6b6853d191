"""ltk/parallel/comm_meter.py without peers: what it patches it restores, torch's P2POp still
accepts the patched isend, control messages are kept apart, and a group the meter cannot see is
left out of "equal" instead of compared as zero."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ltk.parallel.comm_meter import CommMeter, compare, uncounted_groups
from ltk.training.config import RunConfig


def test_patches_are_restored_and_p2pop_accepts_the_counting_isend():
    before = {n: getattr(dist, n) for n in ("all_reduce", "all_gather_single", "reduce_scatter_single", "isend")}
    meter = CommMeter()
    with meter:
        assert dist.isend is c10d.isend is not before["isend"]
        c10d._check_op(dist.isend)  # what P2POp runs on its op: raises unless it is c10d's isend
        meter._counting("all_reduce", lambda t: None)(torch.zeros(5))  # a model tensor: 20 bytes
        meter._counting("all_reduce", lambda t: None)(torch.zeros(1))  # one number: control
        meter._counting("all_gather_single", lambda o, i: None)(torch.zeros(8), torch.zeros(4))
    assert {n: getattr(dist, n) for n in before} == before and c10d.isend is before["isend"]
    assert meter.step_done() == {"all_gather": 32, "all_reduce": 20}
    assert meter.result()["control_bytes"] == {"all_reduce": 4}


def test_disabled_meter_patches_nothing():
    fn = dist.all_reduce
    with CommMeter(enabled=False):
        assert dist.all_reduce is fn


def test_compare_leaves_partly_counted_collectives_out():
    plan = {"data_parallel": {"all_gather": 100, "reduce_scatter": 50}, "tensor_parallel": {"all_reduce": 70}}
    measured = {"per_step": {"all_gather": 100, "reduce_scatter": 50, "all_reduce": 6}}
    assert not compare(measured, plan)["equal"]
    c = compare(measured, plan, ["tensor_parallel"])
    assert c["equal"] and c["by_collective"]["all_reduce"] == {"measured": 6, "plan": 0, "vs_plan": None,
                                                               "partly_counted": True}
    assert not compare({"per_step": {**measured["per_step"], "all_gather": 99}}, plan, ["tensor_parallel"])["equal"]


def test_uncounted_groups_follow_the_engine_auto_picks():
    cfg = RunConfig()
    assert uncounted_groups(cfg, 2) == ["data_parallel"]  # auto without tp: torch DDP's C++ reducer
    cfg.parallel.tp = 2
    assert uncounted_groups(cfg, 2) == [] and uncounted_groups(cfg, 4) == []  # auto with tp: ours
    cfg.parallel.strategy = "fsdp2"
    assert uncounted_groups(cfg, 4) == ["tensor_parallel"]
