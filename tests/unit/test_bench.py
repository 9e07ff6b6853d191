"""The benchmark harness: timing statistics, the results CSV, peaks, the registry, and the
train-step benchmark's proof that our GPT and transformers' GPT-2 are the same model."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json

import pytest
import torch

from ltk import bench
from ltk.bench import BENCHMARKS, Row, Timing, run_benchmark
from ltk.bench.harness import COLUMNS, environment, read_csv, rows_to_markdown, time_fn, write_csv
from ltk.bench.peaks import measure_peaks, peak_for
from ltk.models.gpt import GPTConfig


def _row(provider: str, median: float = 2.0, **kw) -> Row:
    base = dict(op="train-step", shape="B=2,T=8", dtype="fp32", mode="step", provider=provider,
                median_ms=median, p20_ms=median * 0.9, p80_ms=median * 1.2, runs=10,
                throughput=1234.5, throughput_unit="tokens/s", tflops=0.01, device="cpu x",
                commit="abc", torch="2", triton="3", date="2026-01-01T00:00:00+00:00",
                extra=json.dumps({"k": 1}))
    base.update(kw)
    return Row(**base)


# --- timing ---------------------------------------------------------------------------

def test_quantiles_from_samples_interpolate_like_do_bench():
    t = Timing.from_samples([float(v) for v in range(10, 0, -1)])  # 10..1, unsorted
    assert (t.p20_ms, t.median_ms, t.p80_ms, t.runs) == pytest.approx((2.8, 5.5, 8.2, 10))


def test_time_fn_cpu_orders_quantiles_and_counts_runs():
    x = torch.randn(64, 64)
    t = time_fn(lambda: x @ x, device="cpu", warmup=0.01, min_time=0.05)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.runs >= len(t.samples_ms) >= 1


def test_merge_pools_samples():
    a, b = Timing.from_samples([1.0, 2.0]), Timing.from_samples([3.0, 4.0, 5.0])
    m = a.merge(b)
    assert m.runs == 5 and m.median_ms == 3.0


# --- rows: CSV and markdown -------------------------------------------------------------

def test_csv_round_trip_writes_header_once(tmp_path):
    path = tmp_path / "results.csv"
    rows = [_row("ours", pct_of_peak=None, speedup=1.25), _row("transformers", speedup=1.0)]
    write_csv(rows[:1], path)
    write_csv(rows[1:], path)  # append
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == COLUMNS
    assert sum(line.startswith("op,") for line in lines) == 1
    assert read_csv(path) == rows  # types and None survive


def test_csv_refuses_a_different_schema(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("op,provider\nx,y\n")
    with pytest.raises(ValueError, match="columns"):
        write_csv([_row("ours")], path)


def test_markdown_lists_providers_and_provenance():
    md = rows_to_markdown([_row("ours", speedup=1.3), _row("transformers", speedup=1.0)])
    assert "| ours |" in md and "| transformers |" in md
    assert "speedup" in md and "1,234 tokens/s" in md
    assert "GB/s" not in md  # no row has a bandwidth: the column is left out
    assert "commit abc" in md


def test_environment_names_device_and_versions():
    env = environment("cpu")
    assert env["device"] and env["torch"] == torch.__version__ and env["commit"]
    assert env["cpu_cores"] >= 1 and env["date"]


def test_commit_is_read_from_this_checkout():
    import subprocess
    from pathlib import Path

    from ltk.bench.harness import git_commit

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    assert git_commit().removesuffix("-dirty") == head


# --- peaks --------------------------------------------------------------------------------

def test_peak_for_matches_datasheet_names():
    h100 = peak_for("NVIDIA H100 80GB HBM3")
    assert h100 is not None and h100.bf16_tflops == pytest.approx(989.4) and h100.hbm_gbps == 3350
    assert peak_for("NVIDIA H100 PCIe").hbm_gbps == 2000
    assert peak_for("NVIDIA H200").hbm_gbps == 4800
    assert peak_for("NVIDIA A100-SXM4-80GB").hbm_gbps == 2039
    assert peak_for("NVIDIA A100-SXM4-40GB").hbm_gbps == 1555
    assert peak_for("NVIDIA GH200 480GB") is None  # not an H200
    assert peak_for("AMD EPYC 7763 64-Core Processor") is None
    assert peak_for(environment("cpu")["device"]) is None


def test_measure_peaks_runs_on_cpu():
    p = measure_peaks("cpu", copy_mib=8, matmul_n=64, min_time=0.05)
    assert p["copy_gbps"] > 0 and p["matmul_tflops"] > 0 and p["matmul_dtype"] == "float32"
    assert p["datasheet"] is None


# --- registry -------------------------------------------------------------------------------

def test_unknown_benchmark_lists_known_names():
    with pytest.raises(ValueError, match="train-step"):
        run_benchmark("no-such-bench")


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="batch_size"):
        run_benchmark("train-step", batchsize=2)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_option_defaults_match_run_signature(name):
    b = BENCHMARKS[name]
    params = inspect.signature(b.run).parameters
    for o in b.options:
        assert o.name in params and params[o.name].default == o.default, o.name


@pytest.mark.parametrize("module, names", [("attention", bench.ATTENTION_PROVIDERS), ("norms", bench.NORM_PROVIDERS),
                                           ("nf4", bench.NF4_PROVIDERS), ("lora", bench.LORA_PROVIDERS),
                                           ("cross_entropy", bench.CROSS_ENTROPY_PROVIDERS),
                                           ("swiglu", bench.SWIGLU_PROVIDERS), ("rope", bench.ROPE_PROVIDERS)])
def test_help_names_each_sweeps_own_providers(module, names):
    """The registry spells the providers out so --help imports no benchmark; they must be the module's."""
    assert importlib.import_module(f"ltk.bench.{module}").PROVIDERS == names


def test_registry_imports_a_benchmark_only_when_it_runs():
    import subprocess
    import sys

    code = ("import sys; from ltk.bench import BENCHMARKS; assert BENCHMARKS['attention'].description; "
            "print(sorted(m for m in sys.modules if m.startswith('ltk.bench.') or m == 'torch')); "
            "BENCHMARKS['qlora-memory'].run; print(sorted(m for m in sys.modules if m.startswith('ltk.bench.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    before, after = out.stdout.splitlines()
    assert before == "[]" and "'ltk.bench.qlora_memory'" in after and "'ltk.bench.attention'" not in after
    assert bench.Row is bench.harness.Row  # the re-exported names still resolve


def test_options_parse_from_a_command_line():
    b = BENCHMARKS["train-step"]
    assert b.parse_args(["--batch-size", "4", "--min-time", "0.5"]) == {"batch_size": 4, "min_time": 0.5}
    parser = argparse.ArgumentParser()
    b.add_arguments(parser)
    assert b.kwargs_from(parser.parse_args([])) == {}  # unset flags keep run's defaults


# --- cli-startup ------------------------------------------------------------------------------

def test_cli_startup_rows_time_each_command_beside_the_python_floor():
    rows = run_benchmark("cli-startup", commands="help", repeats=1)
    assert [(r.op, r.shape, r.provider) for r in rows] == [("cli-startup", "python -c pass", "python"),
                                                          ("cli-startup", "ltk --help", "ltk")]
    assert all(r.median_ms > 0 and r.runs == 1 and r.device for r in rows)
    extra = json.loads(rows[1].extra)
    assert extra["imports_torch"] is False and "ltk.cli" in extra["ltk_modules"]
    with pytest.raises(ValueError, match="help, train-help, bench-help"):
        run_benchmark("cli-startup", commands="help,version")


# --- train-step ---------------------------------------------------------------------------

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
TINY_RUN = dict(vocab_size=256, batch_size=2, seq_len=16, min_time=0.1, rounds=2, device="cpu")


def test_weight_copy_gives_the_same_model():
    pytest.importorskip("transformers")
    from ltk.bench.train_step import build, check_same_loss, make_batches

    models = build(TINY, torch.device("cpu"))
    x, y = make_batches(TINY.vocab_size, 2, TINY.block_size)[0]
    check = check_same_loss(models["ours"], models["transformers"], x, y)
    assert check["abs_diff"] < 1e-4 and check["max_logit_diff"] < 1e-4
    # the check can fail: forget the Conv1D transpose on the (square) attention projections
    with torch.no_grad():
        for block in models["transformers"].transformer.h:
            block.attn.c_proj.weight.copy_(block.attn.c_proj.weight.t().clone())
    with pytest.raises(RuntimeError, match="disagree"):
        check_same_loss(models["ours"], models["transformers"], x, y)


def test_train_step_reports_both_providers_and_the_ratio():
    pytest.importorskip("transformers")
    rows = run_benchmark("train-step", **TINY_RUN)
    by = {r.provider: r for r in rows}
    assert set(by) == {"ours", "transformers"}
    for r in rows:
        assert r.throughput > 0 and r.throughput_unit == "tokens/s" and r.tflops > 0
        assert r.p20_ms <= r.median_ms <= r.p80_ms and r.mode == "step" and r.dtype == "fp32"
        assert r.pct_of_peak is None and r.peak_mem_mb is None  # a CPU: no known peak
    assert by["transformers"].speedup == 1.0
    assert by["ours"].speedup == pytest.approx(by["ours"].throughput / by["transformers"].throughput)
    extra = json.loads(by["transformers"].extra)
    assert extra["loss_check"]["abs_diff"] < 1e-4 and extra["attn_implementation"] == "sdpa"
    json.dumps([dataclasses.asdict(r) for r in rows])  # what `ltk bench --json` prints


def test_train_step_without_transformers_reports_ours_only(monkeypatch):
    def missing():
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(bench.train_step, "_import_transformers", missing)
    with pytest.warns(RuntimeWarning, match="baselines"):
        rows = run_benchmark("train-step", **{**TINY_RUN, "rounds": 1, "min_time": 0.05})
    assert [r.provider for r in rows] == ["ours"] and rows[0].speedup is None
    assert "baselines" in json.loads(rows[0].extra)["baseline_missing"]


def test_result_file_carries_command_method_machine_and_rows(tmp_path):
    from ltk.bench import train_step
    from ltk.bench.results import result_filename, write_result

    assert result_filename("train-step", "NVIDIA H200", "2026-11-29T10:00:00") == "train-step_nvidia-h200_2026-11-29.md"
    row = Row.stamped("cpu", op="x", shape="1", dtype="fp32", mode="step", provider="ours", median_ms=1.0,
                      p20_ms=0.9, p80_ms=1.1, runs=3, throughput=5.0, throughput_unit="tokens/s")
    path = write_result(tmp_path, "train-step", [row], train_step.run, "cpu", command="ltk bench train-step")
    text = path.read_text()
    assert path.name.startswith("train-step_") and path.name.endswith(".md")
    for needle in ("ltk bench train-step", "## Method", "transformers", "## Machine", "torch", "| ours |"):
        assert needle in text


@pytest.mark.parametrize("model", ["llama", "bert", "t5"])
def test_train_step_for_the_rest_of_the_zoo(model):
    pytest.importorskip("transformers")
    rows = run_benchmark("train-step", model=model, batch_size=2, seq_len=16, min_time=0.1, rounds=2, device="cpu")
    assert [r.provider for r in rows] == ["ours", "transformers"]
    assert all(r.throughput > 0 for r in rows) and rows[1].speedup == 1.0
    assert json.loads(rows[0].extra)["max_logit_diff"] < 1e-4
