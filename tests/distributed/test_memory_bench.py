"""`ltk bench parallel-memory` end to end on 2 gloo ranks and a tiny GPT: the real `ltk train
--nproc 2` with the memory trace on, every rank's figures in the run's summary.json and in the
bench's JSON, the plot, and the result file with its JSON and plot beside it.

A model this small cannot meet the goals (the CPU allocator and thread pools of a process hold
more than its model states), so the test checks the path and the figures' sanity, not the verdict:
that is what the full run (gpt2-350m, 4 ranks) is for."""
import json

import pytest

from ltk.bench import BENCHMARKS, run_benchmark
from ltk.bench.results import parse_result, write_result

PHASES = ["init", "train", "eval", "save"]


@pytest.mark.slow  # 4 processes importing torch (the launcher, torchrun, 2 ranks): about 15 s of CPU
def test_the_bench_measures_every_rank_and_phase_of_a_real_run(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    tiny = (f"--data.source {tiny_corpus} --data.vocab_size 300 --data.min_chars 16 --data.val_fraction 0.1 "
            "--model.n_layer 2 --model.n_head 2 --model.n_embd 32 --model.block_size 32")
    rows = run_benchmark("parallel-memory", quick=True, seq_len=32, out=str(out), overrides=tiny, timeout_s=300.0)
    result = json.loads((out / "parallel-memory.json").read_text())
    assert result["run"]["returncode"] == 0 and result["run"]["aborted"] is None
    assert result["world"] == 2 and result["plan"]["strategy"] == "zero3"
    assert result["full_copy"] == 16 * result["params"] and 0 < result["plan"]["total"]
    ranks = {r["rank"]: r for r in result["ranks"]}
    assert sorted(ranks) == [0, 1] and not result["goals"]["phases_not_reached"]
    for r in ranks.values():
        assert list(r["phases"]) == PHASES and r["complete"]
        assert 100 * 2**20 < r["baseline"] < r["peak"] < 4 * 2**30  # torch is loaded; a tiny run stays small
        for ph in r["phases"].values():
            assert ph["above_baseline"] == ph["peak"] - r["baseline"] > 0
            assert ph["vs_plan"] == ph["above_baseline"] / result["plan"]["total"]
    # the trainer's own summary lists both ranks' peaks per phase, beside the same plan
    summary = json.loads((out / "summary.json").read_text())["memory_per_rank"]
    assert summary["plan"] == result["plan"] and summary["full_copy"] == result["full_copy"]
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    for r in summary["ranks"]:
        assert r["exact_phase_peaks"] and r["phases"] == ranks[r["rank"]]["phases"]  # the trace's ends are exact
    assert (out / "parallel-memory.png").stat().st_size > 10_000
    assert sorted((r.provider, r.mode) for r in rows) == sorted((f"rank{k}", p) for k in (0, 1) for p in PHASES)

    md = write_result(tmp_path / "results", "parallel-memory", rows, BENCHMARKS["parallel-memory"].run, "cpu",
                      command="ltk bench parallel-memory --quick")
    verdict = next(t for t in parse_result(md).tables if t.section == "Verdict")
    assert [row[0] for row in verdict.rows] == PHASES
    for row in verdict.rows:  # "ratio ok|FAIL", the ratio of the phase's largest rank
        ratio, word = row[2].split()
        assert float(ratio) == round(result["goals"]["plan"]["worst_by_phase"][row[0]], 2)
        assert word == ("ok" if float(ratio) <= 1.25 else "FAIL")
    assert json.loads(md.with_suffix(".json").read_text())["goals"] == result["goals"]
    assert md.with_suffix(".png").stat().st_size > 10_000
