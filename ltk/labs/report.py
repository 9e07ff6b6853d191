"""The report writer every lab uses: report.md (question, tables, plots, explanation, the
command that reproduces it, provenance), results.json (every number in the report, for
machines) and PNG plots (matplotlib, headless).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def provenance() -> dict[str, Any]:
    """Where and with what a result was measured."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} threads)")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    def __init__(self, title: str, question: str, command: str):
        self.title, self.question, self.command = title, question, command
        self.sections: list[str] = []
        self.results: dict[str, Any] = {}
        self.plots: list[tuple[str, Any]] = []

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        self.sections.append((f"{caption}\n\n" if caption else "") + markdown_table(headers, rows))

    def plot(self, name: str, fig: "plt.Figure", caption: str = "") -> None:
        self.plots.append((name, fig))
        self.sections.append(f"![{caption or name}]({name}.png)")

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in self.plots:
            fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
        prov = provenance()
        body = [f"# {self.title}", f"**Question.** {self.question}", *self.sections,
                "## Reproduce", f"```\n{self.command}\n```",
                "## Measured on", markdown_table(["key", "value"], sorted(prov.items()))]
        (out / "report.md").write_text("\n\n".join(body) + "\n")
        (out / "results.json").write_text(
            json.dumps({"question": self.question, "command": self.command, "provenance": prov,
                        "argv": sys.argv, **self.results}, indent=2, default=str)
        )
        return out / "report.md"


WALL_TIME = "wall time (s)"  # the key under "## Measured on" and, as wall_s, in results.json


def record_wall_time(report_md: str | Path, seconds: float) -> None:
    """Add a finished lab's wall time to what `Report.write` wrote: a row of the "Measured on"
    table, which closes report.md, and `wall_s` in results.json beside it. The registry's
    `quick_minutes` is checked against the reports that record it."""
    report_md = Path(report_md)
    text = report_md.read_text()
    if not text.rstrip("\n").endswith("|"):
        raise ValueError(f"{report_md}: does not end with the 'Measured on' table")
    report_md.write_text(text.rstrip("\n") + f"\n| {WALL_TIME} | {seconds:.0f} |\n")
    results = report_md.with_name("results.json")
    if results.exists():
        data = json.loads(results.read_text())
        data["wall_s"] = seconds
        results.write_text(json.dumps(data, indent=2, default=str))
