"""`ltk bench parallel-comm` end to end on one configuration (a real `ltk train --parallel ddp
--nproc 2` run): its result file carries the bytes-per-step table the README's headline reads, and
that headline counts measured = plan; an unknown configuration is refused by name."""
from __future__ import annotations

import pytest

from ltk.bench import parallel_comm
from ltk.bench.readme_results import headline
from ltk.bench.results import collect, write_result


def test_one_run_writes_the_table_and_its_headline(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    rows = parallel_comm.run(configs="ddp", seq_len=32, out=str(tmp_path / "runs"), timeout_s=300)
    (run,) = rows.result["runs"]
    assert run["equal"] and run["steps"] == 2 and run["steps_equal"], run
    ddp = run["by_collective"]["all_reduce"]
    assert ddp["measured"] == ddp["plan"] > 0 and [r.mode for r in rows] == ["all_reduce"]
    path = write_result(tmp_path / "results", "parallel-comm", rows, parallel_comm.run, device="cpu",
                        command="ltk bench parallel-comm --configs ddp")
    assert "| ddp | 2 | all_reduce |" in path.read_text() and path.with_suffix(".json").exists()
    (result,) = collect(tmp_path / "results")
    assert headline(result) == "bytes per step: measured = plan in 1 of 1 rows"


def test_table_marks_what_the_meter_cannot_see():
    runs = [{"name": "fsdp2 x tp", "world": 4, "not_counted": ["tensor_parallel"],
             "by_collective": {"all_gather": {"measured": 10, "plan": 10},
                               "all_reduce": {"measured": 3, "plan": 0, "partly_counted": True}}},
            {"name": "zero3", "world": 2, "error": "exit 1: boom"}]
    text = parallel_comm.table(runs)
    assert "| fsdp2 x tp | 4 | all_gather | 10 / 10 |" in text
    assert "— / 0 (not counted: tensor_parallel)" in text and "— / — (exit 1: boom)" in text


def test_unknown_configuration_is_named():
    with pytest.raises(ValueError, match="'zero4'.*known: ddp"):
        parallel_comm.run(configs="ddp,zero4")
