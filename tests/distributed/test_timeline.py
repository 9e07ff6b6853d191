"""Per-rank timelines (ltk/parallel/timeline.py): the split of a step into compute, exposed
communication and idle, first on synthetic records with known answers, then on 2 gloo
processes where one rank is made late on purpose, so the other must show the wait as idle."""
from __future__ import annotations

import time

import pytest
import torch

from ltk.parallel.dist import Comm, spawn
from ltk.parallel.timeline import analyse, per_rank_means, split_step, step_times

WORLD = ((0, 1),)


def _ev(op, seq, post, start, end, match=WORLD):
    return {"op": op, "match": match, "seq": seq, "post": post, "start": start, "end": end}


def test_split_of_synthetic_steps_is_exact():
    # rank 0 posts the all-reduce at 1.0 and blocks to 3.0; rank 1 only posts at 2.5:
    # rank 0 idles 1.5 s, then both move bytes until 3.0 (0.5 s of exposed comm)
    r0 = [{"step": 0, "start": 0.0, "end": 3.2, "events": [_ev("all_reduce", 0, 1.0, 1.0, 3.0)]}]
    r1 = [{"step": 0, "start": 0.1, "end": 3.1, "events": [_ev("all_reduce", 0, 2.5, 2.5, 3.0)]}]
    rows = analyse([r0, r1])
    a, b = rows
    assert (a["rank"], b["rank"]) == (0, 1)
    assert a["idle"] == pytest.approx(1.5) and a["comm"] == pytest.approx(0.5)
    assert a["compute"] == pytest.approx(3.2 - 2.0)
    assert b["idle"] == pytest.approx(0.0) and b["comm"] == pytest.approx(0.5)
    assert b["compute"] == pytest.approx(3.0 - 0.5)
    for r in rows:
        assert r["compute"] + r["comm"] + r["idle"] == pytest.approx(r["wall"])
    assert step_times(rows) == {0: pytest.approx(3.2)}
    assert [m["rank"] for m in per_rank_means(rows)] == [0, 1]


def test_async_overlap_and_p2p_matching():
    # an async all-reduce posted at 0.0 by both, waited at 2.0, done at 2.2: 0.2 s exposed, no idle
    # a message 0 -> 1 sent at 1.0, rank 1 waits from 0.5 to 1.3: 0.5 s idle, 0.3 s comm
    p2p = ((0, 1), 0, 1)
    r0 = [{"step": 0, "start": 0.0, "end": 2.5, "events": [
        _ev("all_reduce", 0, 0.0, 2.0, 2.2), {"op": "send", "match": p2p, "seq": 0, "post": 1.0}]}]
    r1 = [{"step": 0, "start": 0.0, "end": 2.5, "events": [
        _ev("recv", 0, 0.2, 0.5, 1.3, match=p2p), _ev("all_reduce", 0, 0.0, 2.0, 2.2)]}]
    rows = analyse([r0, r1])
    assert rows[0]["comm"] == pytest.approx(0.2) and rows[0]["idle"] == pytest.approx(0.0)
    assert rows[1]["idle"] == pytest.approx(0.5) and rows[1]["comm"] == pytest.approx(0.3 + 0.2)
    assert rows[1]["comm_by_op"] == {"recv": pytest.approx(0.3), "all_reduce": pytest.approx(0.2)}
    # without a shared clock (CUDA events) nothing can be called idle
    assert split_step(r1[0], None)["idle"] == 0.0


def _late_rank_worker(rank: int, world: int, folder: str) -> dict:
    from ltk.parallel.timeline import Timeline

    comm, x = Comm(), torch.ones(1024)
    with Timeline("cpu") as tl:
        for step in range(3):
            comm.barrier()  # outside a step: not recorded
            tl.begin_step(step)
            if rank == world - 1:
                time.sleep(0.08)  # "compute" on the last rank only
            comm.all_reduce(x)  # the others wait for it here
            h = comm.all_reduce(x, async_op=True)
            time.sleep(0.03)  # compute that hides the async all-reduce
            h.wait()
            if world > 1:  # a message around the ring
                w = comm.send(x, (rank + 1) % world)
                comm.recv(torch.empty(1024), (rank - 1) % world).wait()
                w.wait()
            tl.end_step()
        rows = tl.flush()
        tl.write(folder)
    return {"rows": rows}


def _two_ranks(rank: int, world: int, folder: str, cfgs) -> dict:
    """Both 2-process checks in one group (a spawn costs seconds of torch imports per rank):
    the late rank first, then `ltk train` for each (config, None) job."""
    from engine_runs import train_jobs

    res = _late_rank_worker(rank, world, folder)
    train_jobs(rank, world, cfgs)
    return res


@pytest.fixture(scope="module")
def two_rank_runs(tiny_corpus, tmp_path_factory):
    """One spawn of 2 processes: the late-rank timeline (in `late/`) and two training runs,
    data parallel (`ddp/`) and a 2-stage pipeline (`pp/`)."""
    from tests.distributed.test_parallel_trainer import _config

    root = tmp_path_factory.mktemp("timeline")
    (root / "late").mkdir()
    cfgs = [_config(tiny_corpus, root / "ddp", "ddp", steps=4),
            _config(tiny_corpus, root / "pp", pp=2, steps=4, grad_accum=2)]
    return root, spawn(_two_ranks, 2, str(root / "late"), [(c, None) for c in cfgs], timeout_s=240)


@pytest.mark.parametrize("world", [2, 4])
def test_a_late_rank_shows_as_idle_on_the_others(world, tmp_path, request):
    if world == 2:  # run in the module's 2-process group
        root, res = request.getfixturevalue("two_rank_runs")
        folder = root / "late"
    else:
        res, folder = spawn(_late_rank_worker, world, str(tmp_path), timeout_s=90), tmp_path
    rows = res[0]["rows"]
    assert all(r["rows"] is None for r in res[1:])  # gathered to rank 0 only
    assert sorted({(r["step"], r["rank"]) for r in rows}) == [(s, k) for s in range(3) for k in range(world)]
    for r in rows:
        assert r["compute"] + r["comm"] + r["idle"] == pytest.approx(r["wall"], abs=1e-9)
        assert r["compute"] >= 0.025  # the 30 ms under which the async all-reduce hid
        late = r["rank"] == world - 1
        if late:
            assert r["compute"] >= 0.1 and r["idle"] < 0.03, r
        else:
            assert r["idle"] >= 0.05, r  # most of the 80 ms the last rank computed
    assert (folder / "timeline.json").exists() and (folder / "timeline.png").stat().st_size > 1000


def test_a_multi_process_training_run_writes_its_timeline(two_rank_runs):
    """`ltk train` on 2 processes: timeline.json (every step x rank), timeline.png and the
    per-rank split in summary.json, for data parallelism and for a pipeline."""
    import json

    root = two_rank_runs[0]
    for name in ("ddp", "pp"):
        run = root / name
        doc = json.loads((run / "timeline.json").read_text())
        assert doc["world"] == 2 and doc["clock"] == "host-monotonic"
        assert sorted((r["step"], r["rank"]) for r in doc["steps"]) == [(s, k) for s in range(4) for k in range(2)]
        for r in doc["steps"]:
            assert r["compute"] > 0 and r["compute"] + r["comm"] + r["idle"] == pytest.approx(r["wall"], abs=1e-9)
        assert (run / "timeline.png").stat().st_size > 1000
        summary = json.loads((run / "summary.json").read_text())
        assert [m["rank"] for m in summary["timeline"]["per_rank"]] == [0, 1]
    ddp = json.loads((root / "ddp" / "timeline.json").read_text())["steps"]
    assert all("all_reduce" in r["comm_by_op"] for r in ddp)  # the gradient buckets and the loss
    pp = json.loads((root / "pp" / "timeline.json").read_text())["steps"]
    assert sum(r["idle"] for r in pp if r["rank"] == 1) > 0  # the last stage waits for the first forward


def test_an_empty_flush_keeps_the_last_window_to_plot():
    from ltk.parallel.timeline import Timeline

    tl = Timeline("cpu")
    with tl:
        tl.begin_step(0)
        tl.end_step()
        assert len(tl.flush()) == 1
        assert tl.flush() == []  # nothing recorded since: nothing new, the plotted window stays
    assert len(tl.last_window[0]) == 1 and len(tl.rows) == 1
    assert Timeline("cpu", enabled=False).flush() is None


def test_a_wait_counts_in_the_step_that_waits():
    """An async collective posted in step 0 (ZeRO-1/2's parameter all-gather at step()) and
    waited for in step 1 (the next forward) is exposed in step 1, not in step 0."""
    from ltk.parallel.timeline import Timeline

    class Work:
        def wait(self):
            time.sleep(0.03)

    tl = Timeline("cpu")
    with tl:
        tl.begin_step(0)
        h = tl.call("all_gather", (0,), Work, True, None, None)
        tl.end_step()
        tl.begin_step(1)
        h.wait()
        h.wait()  # a second wait returns at once: nothing more is recorded
        tl.end_step()
        first, second = tl.flush()
    assert first["comm"] == 0.0 and "all_gather" not in first["comm_by_op"]
    assert second["comm_by_op"]["all_gather"] >= 0.029  # the sleep inside wait()
    assert sum(e["op"] == "all_gather" for e in tl.last_window[0][1]["events"]) == 1


class _FakeEvent:
    """Stands in for torch.cuda.Event on a CPU: record() notes the host time."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.monotonic()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_cuda_bookkeeping_with_events(monkeypatch):
    """The CUDA path (events on the compute stream, no shared clock) resolves to seconds from
    the step start, with every blocked interval counted as exposed comm and none as idle."""
    from ltk.parallel.timeline import Timeline

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    class Work:
        def wait(self):
            time.sleep(0.02)

    tl = Timeline("cpu")
    tl.cuda, tl.clock = True, "cuda-events"
    with tl:
        tl.begin_step(0)
        tl.call("all_reduce", (0,), lambda: time.sleep(0.03), False, None, None)  # a synchronous collective
        h = tl.call("all_gather", (0,), Work, True, None, None)
        time.sleep(0.01)  # compute the async gather hides under
        h.wait()
        tl.end_step()
        (row,) = tl.flush()
    assert row["idle"] == 0.0
    assert row["comm"] == pytest.approx(0.05, abs=0.015)
    assert row["comm_by_op"]["all_reduce"] == pytest.approx(0.03, abs=0.01)
    assert row["compute"] == pytest.approx(row["wall"] - row["comm"]) and row["compute"] >= 0.009
