"""How long a lab's quick preset takes is said once, in the registry (`Lab.quick_minutes`):
README's Labs table must show the same, and the committed lab reports that record their wall
time must agree with it. `ltk lab run` records that wall time in every new report."""
import json
import math
import re
from pathlib import Path

import pytest

from ltk.bench.results import parse_result
from ltk.labs import registry
from ltk.labs.registry import Lab, list_labs, run_lab
from ltk.labs.report import WALL_TIME, Report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "ltk" / "bench" / "results"


def readme_labs_table(text: str) -> dict[str, list[str]]:
    """`name -> cells` of the table under README's "## Labs" heading."""
    section = text.split("\n## Labs\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(header), line
        out[cells[0].strip("`")] = cells
    return out


def recorded_wall_seconds(path: Path) -> float | None:
    """The wall time a committed lab report records: the "Measured on" row `ltk lab run` adds,
    or, in reports older than that row, the scaling lab's closing sentence."""
    measured = next((t for t in parse_result(path).tables if t.section == "Measured on"), None)
    info = dict(measured.rows) if measured else {}
    if WALL_TIME in info:
        return float(info[WALL_TIME])
    m = re.search(r"The whole lab ran in (\d+(?:\.\d+)?) s\.", path.read_text(encoding="utf-8"))
    return float(m[1]) if m else None


def test_readme_labs_table_shows_each_registered_lab_with_its_quick_duration():
    table = readme_labs_table((ROOT / "README.md").read_text(encoding="utf-8"))
    labs = {lab.name: lab for lab in list_labs()}
    assert set(table) == set(labs), "README's Labs table must list exactly the registry's labs"
    wrong = {name: (cells[2], labs[name].quick_duration) for name, cells in table.items()
             if cells[2] != labs[name].quick_duration}
    assert not wrong, (f"README's Labs table disagrees with the registry (README, registry): {wrong}; "
                       "the registry (each lab's quick_minutes) is the source")


def test_readme_parser_reads_the_duration_column():
    text = ("# t\n\n## Labs\n\n| lab | question | quick preset (2-core CPU) | result |\n|---|---|---|---|\n"
            "| `a` | Why? | ~15 s | [report](x.md) |\n\n## Next\n\n| x |\n|---|\n| y |\n")
    assert readme_labs_table(text) == {"a": ["`a`", "Why?", "~15 s", "[report](x.md)"]}


@pytest.mark.parametrize("minutes, text", [(0.25, "~15 s"), (0.67, "~40 s"), (0.75, "~45 s"), (1.0, "~1 min"),
                                           (1.2, "~1.2 min"), (9.0, "~9 min")])
def test_quick_duration_reads_as_seconds_under_a_minute(minutes, text):
    assert Lab("x", "q?", lambda out, quick: out, quick_minutes=minutes).quick_duration == text


def test_committed_reports_agree_with_the_registry_where_they_record_a_wall_time():
    labs = {lab.name: lab for lab in list_labs()}
    checked = []
    for path in sorted(RESULTS.glob("*-lab_*.md")):
        r = parse_result(path)
        name = r.what.removesuffix("-lab")
        seconds = recorded_wall_seconds(path)
        if seconds is None or not any("--quick" in c for c in r.commands):
            continue
        registered = labs[name].quick_minutes * 60
        assert abs(math.log(registered / seconds)) <= math.log(1.5), (
            f"{path.name} records {seconds:.0f} s for the quick preset; the registry says "
            f"{labs[name].quick_duration}: update {name}'s quick_minutes (and README's Labs table)")
        checked.append(name)
    assert "scaling" in checked  # at least the one report that already records it


def test_run_lab_records_the_wall_time_in_the_report_and_results(tmp_path, monkeypatch):
    def run(out: Path, quick: bool) -> Path:
        rep = Report("Lab: t", "Q?", "ltk lab run t --quick")
        rep.table(["a"], [[1]])
        return rep.write(out)

    monkeypatch.setattr(registry, "get_lab", lambda name: Lab(name, "Q?", run, quick_minutes=0.25))
    report = run_lab("t", tmp_path / "run", quick=True)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["wall_s"] >= 0 and results["question"] == "Q?"
    # the committed form of the report: the results reader finds the row in the Measured on table
    date = results["provenance"]["date"][:10]
    committed = tmp_path / f"t-lab_cpu_{date}.md"
    committed.write_text(report.read_text())
    assert recorded_wall_seconds(committed) == round(results["wall_s"])
    assert parse_result(committed).kind == "lab"
