"""README's Results section is generated from ltk/bench/results/ (ltk/bench/readme_results.py): the
committed README must equal what the generator gives, every committed result file must parse,
and the headline rules must read the real writers' formats (ltk/bench/results.py, ltk/labs/report.py,
ltk/bench/gpu_check.py) into the right figures."""
import re
from pathlib import Path

import pytest

from ltk.bench import gpu_check
from ltk.bench import readme_results as rr
from ltk.bench.harness import Row
from ltk.bench.results import collect, parse_result, result_filename, write_result
from ltk.bench.sweep import Skip, SweepRows

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "ltk" / "bench" / "results"


def test_readme_results_section_is_what_the_generator_gives():
    """Fails when a result was added or changed without regenerating README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = rr.updated_readme(readme, rr.render(collect(RESULTS), ROOT), ROOT / "README.md")
    assert readme == expected, ("README.md's Results section is out of date with ltk/bench/results/: "
                                "run `python -m ltk.bench.readme_results` and commit README.md")


def test_every_committed_result_file_parses_and_has_a_headline():
    files = sorted(RESULTS.glob("*.md"))
    assert len(files) >= 10
    for path in files:
        r = parse_result(path)
        assert r.kind in {"benchmark", "lab", "gpu-check"} and r.device and r.commands and r.tables, path
        assert path.name.endswith(f"_{r.date}.md"), path
        if r.what in rr.HEADLINES:  # a rule that matches nothing would silently give "see file"
            assert rr.headline(r) != "see file", path
    shown = {r.path.name for r in collect(RESULTS)}
    assert shown <= {p.name for p in files} and len(shown) >= 10


def _row(provider, ms, shape="n=8", mode="fwd+bwd", op="toy"):
    return Row(op=op, shape=shape, dtype="fp32", mode=mode, provider=provider, median_ms=ms,
               p20_ms=ms * 0.9, p80_ms=ms * 1.1, runs=5)


def test_compare_reads_a_written_benchmark_at_its_headline_point(tmp_path):
    """Ours twice as fast as torch at the last fwd+bwd point, 8x at a fwd point (not the
    headline mode), 1x at a smaller fwd+bwd point: the headline is 2.00x at n=64."""
    rows = SweepRows([_row("ours", 1.0, "n=8"), _row("torch", 1.0, "n=8"),
                      _row("ours", 10.0, "n=64"), _row("torch", 20.0, "n=64"),
                      _row("ours", 1.0, "n=64", "fwd"), _row("torch", 8.0, "n=64", "fwd")],
                     [Skip("liger", "*", "liger-kernel not installed")])
    path = write_result(tmp_path, "toy", rows, result_filename, device="cpu", command="ltk bench toy --x 1")
    r = parse_result(path)
    assert (r.kind, r.what, r.commands) == ("benchmark", "toy", ("ltk bench toy --x 1",))
    assert rr.Compare("ours", "torch")(r) == ["n=64 fwd+bwd: ours 10 ms vs torch 20 ms: 2.00x"]
    assert rr.Compare("torch", "ours")(r) == ["n=64 fwd+bwd: torch 20 ms vs ours 10 ms: 0.50x"]
    assert rr.Compare("ours", "liger")(r) == ["liger: not run (liger-kernel not installed)"]
    assert rr.headline(r) == "see file"  # no rule for "toy": nothing is invented


def test_compare_memory_and_one_headline_per_op(tmp_path):
    rows = [_row("ours", 2.0, op="a[x]"), _row("hf", 3.0, op="a[x]"), _row("ours", 4.0, op="a[y]"),
            _row("hf", 2.0, op="a[y]")]
    r = parse_result(write_result(tmp_path, "toy", rows, result_filename, device="cpu", command="c"))
    assert rr.Compare("ours", "hf")(r) == ["a[x]: ours 2 ms vs hf 3 ms: 1.50x", "a[y]: ours 4 ms vs hf 2 ms: 0.50x"]
    mem = [Row(op="m", shape=s, dtype="bf16", mode="memory", provider=p, median_ms=0, p20_ms=0, p80_ms=0,
               runs=0, peak_mem_mb=v) for s, p, v in (("total", "ours", 3000.0), ("total", "bnb", 4000.0),
                                                      ("codes", "ours", 1.0), ("codes", "bnb", 1.0))]
    r = parse_result(write_result(tmp_path / "m", "mem", mem, result_filename, device="cpu", command="c"))
    assert rr.Compare("ours", "bnb", "memory", shape="total")(r) == ["total: ours 3,000 MB vs bnb 4,000 MB: 0.75x"]


def test_lab_report_and_its_rules(tmp_path):
    from ltk.labs.report import Report

    rep = Report("Lab: toy", "Does it work?", "ltk lab run toy --quick")
    rep.table(["model", "bits/byte", "N", "state MiB (measured / plan)"],
              [["gpt (1 layer)", 1.5, 2, "3.00 / 3.00"], ["bigram (λ=0.9)", 2.25, 4, "2.00 / 2.50"],
               ["unigram", 3.0, 4, "— / 1.00"]])
    text = rep.write(tmp_path / "run").read_text()
    day = text.split("| date | ")[1][:10]  # a lab states its date in its "Measured on" table
    path = tmp_path / f"toy-lab_some-cpu_{day}.md"
    path.write_text(text)
    r = parse_result(path)
    assert (r.kind, r.date, r.commands) == ("lab", day, ("ltk lab run toy --quick",))
    assert rr.Listing("bits/byte", "model")(r) == ["bits/byte: gpt 1.5 · bigram 2.25 · unigram 3"]
    assert rr.Listing("bits/byte", "model", at_last="N")(r) == ["bits/byte at N = 4: bigram 2.25 · unigram 3"]
    assert rr.Range("bits/byte")(r) == ["bits/byte: 1.5 to 3 (median 2.25, 3 rows)"]
    assert rr.Agree(("state MiB (measured / plan)",))(r) == \
        ["state MiB: measured = plan in 1 of 2 rows (1 not measured)"]
    assert rr.Count("N", "4", "rows")(r) == ["N 4: 2 of 3 rows"]
    assert rr.Same("N")(r) == ["N: 2 different values over 3 rows"]


def test_gpu_check_report_is_read(tmp_path):
    checks = [gpu_check.Check("attention", "causal", "bf16", {"out0": 1e-3}, {"out0": 1e-3}, passed=True),
              gpu_check.Check("lora", "M5", "fp16", {"out0": 1.0}, {"out0": 1e-3}, passed=False)]
    step = dict(op="train-step", shape="B=16,T=1024", mode="step", throughput_unit="tokens/s", extra="{}")
    rows = [_row("ours", 2.0, op="attention"), _row("sdpa", 3.0, op="attention"),
            _row("ours", 5.0, op="layernorm"), _row("torch", 4.0, op="layernorm"),
            Row(**step, dtype="bf16", provider="ours", median_ms=10.0, p20_ms=9.0, p80_ms=11.0, runs=20,
                throughput=1600.0, pct_of_peak=40.0),
            Row(**step, dtype="bf16", provider="transformers", median_ms=20.0, p20_ms=19.0, p80_ms=21.0, runs=20,
                throughput=800.0, pct_of_peak=20.0)]
    text = gpu_check.report({"device": "NVIDIA H200", "date": "2026-12-01 10:00:00 UTC"}, checks, rows,
                            ["attention causal: flash-attn at T=1024: flash-attn not installed",
                             "attention causal: flash-attn: flash-attn not installed"])
    path = tmp_path / "gpu-check_nvidia-h200_2026-12-01.md"
    path.write_text(text)
    r = parse_result(path)
    assert (r.kind, r.device, r.date, r.commands) == ("gpu-check", "NVIDIA H200", "2026-12-01",
                                                      ("python -m ltk.bench.gpu_check",))
    parts = rr.headline(r).split("; ")
    assert parts[:4] == ["result PASS: 1 of 2 kernel checks", "attention: ours 2 ms vs sdpa 3 ms: 1.50x",
                         "flash-attn: not run (flash-attn not installed)", "layernorm: ours 5 ms vs torch 4 ms: 0.80x"]
    # the train step: in the benchmark table (op column) or in a table of its own
    assert any(re.fullmatch(r"(train-step: )?ours 10(\.0)? ms vs transformers 20(\.0)? ms: 2\.00x", p) for p in parts)


def _bench_file(folder: Path, what: str, device: str, date: str, ms: float = 1.0) -> Path:
    path = folder / f"{what}_{device.lower().replace(' ', '-')}_{date}.md"
    path.write_text(f"# {what} on {device} ({date})\n\n## Command\n\n```\nltk bench {what}\n```\n\n## Rows\n\n"
                    "| op | shape | dtype | mode | provider | median ms [p20, p80] |\n|---|---|---|---|---|---|\n"
                    f"| s | n=1 | fp32 | step | ours | {ms} [1, 1] |\n"
                    "| s | n=1 | fp32 | step | transformers | 2 [2, 2] |\n")
    return path


def test_newest_date_of_a_what_and_device_wins(tmp_path):
    _bench_file(tmp_path, "train-step", "Dev A", "2026-01-05", ms=1.0)
    newest = _bench_file(tmp_path, "train-step", "Dev A", "2026-02-01", ms=0.5)
    _bench_file(tmp_path, "train-step", "Dev A", "2025-12-31", ms=4.0)
    other = _bench_file(tmp_path, "train-step", "Dev B", "2025-06-01")
    got = collect(tmp_path)
    assert [r.path for r in got] == [newest, other]
    assert rr.headline(got[0]) == "ours 0.5 ms vs transformers 2 ms: 4.00x"


@pytest.mark.parametrize("name, text, why", [
    ("bad name.md", "# x on D (2026-01-01)\n", "the name must be"),
    ("x_d_2026-01-01.md", "no title\n", "'# ' title"),
    ("x_d_2026-01-01.md", "# something else\n", "the title must be"),
    ("x_d_2026-01-02.md", "# x on D (2026-01-01)\n\n## Command\n\n```\nltk\n```\n", "its name says 2026-01-02"),
    ("x_d_2026-01-01.md", "# x on D (2026-01-01)\n\n## Rows\n\n| a | b |\n|---|---|\n| 1 |\n", "has 2 columns"),
    ("x_d_2026-01-01.md", "# x on D (2026-01-01)\n\n## Command\n\n```\nltk\n", "not closed"),
    ("x_d_2026-01-01.md", "# x on D (2026-01-01)\n\n## Method\n\ntext\n", "no command"),
    ("x-lab_d_2026-01-01.md", "# Lab: x\n\n## Reproduce\n\n```\nltk\n```\n", "Measured on"),
])
def test_an_unparsable_file_is_an_error_naming_it(tmp_path, name, text, why):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=why) as err:
        collect(tmp_path)
    assert name in str(err.value)


def test_cli_rewrites_between_the_markers_and_check_reports_staleness(tmp_path, capsys):
    results = tmp_path / "ltk" / "bench" / "results"
    results.mkdir(parents=True)
    _bench_file(results, "train-step", "Dev A", "2026-01-05")
    readme = tmp_path / "README.md"
    before, after = "# title\n\n## Results\n\nintro\n\n", "\n\n## Next\n\nkept\n"
    readme.write_text(before + rr.BEGIN + "\nold, typed by hand\n" + rr.END + after)
    args = ["--readme", str(readme), "--results", str(results)]
    assert rr.main(["--check", *args]) == 1
    assert "python -m ltk.bench.readme_results" in capsys.readouterr().err
    assert rr.main(args) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "typed by hand" not in text
    assert "[train-step_dev-a_2026-01-05.md](ltk/bench/results/train-step_dev-a_2026-01-05.md)" in text
    assert "ours 1.0 ms vs transformers 2 ms: 2.00x" in text and "No GPU check committed yet" in text
    assert rr.main(["--check", *args]) == 0
    readme.write_text("no markers\n")
    assert rr.main(["--check", *args]) == 2
    assert "results:begin" in capsys.readouterr().err
