"""The lab registry: each lab answers one question with a table, a plot, and a few
sentences, written into its own run folder.

A lab module defines a `Lab` and registers it here. `ltk lab list` prints the registry;
`ltk lab run NAME [--quick]` calls `lab.run(out_dir, quick)` with a fresh timestamped
folder `runs/<lab>/<timestamp>/` and adds the run's wall time to its report. Every lab has a
quick CPU preset (minutes, run in CI) and a full preset meant for a GPU.

How long a quick preset takes is said in one place, the lab's `quick_minutes`: `ltk lab list`
prints it and README's Labs table must show it (tests/unit/test_readme_labs.py checks both that
and that it agrees with the wall time the committed reports under ltk/bench/results/ record).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ltk.training.writable import writable_dir

# name -> module that defines `LAB`; imported lazily so `ltk lab list` stays fast
_LAB_MODULES = {
    "pretrain": "ltk.labs.pretrain",
    "attention": "ltk.labs.attention",
    "families": "ltk.labs.families",
    "pipeline": "ltk.labs.pipeline",
    "zero": "ltk.labs.zero",
    "parallelism": "ltk.labs.parallelism",
    "finetune": "ltk.labs.finetune",
    "scaling": "ltk.labs.scaling",
    "long-context": "ltk.labs.long_context",
}


@dataclass
class Lab:
    name: str
    question: str  # the one question the lab answers
    run: Callable[[Path, bool], Path]  # (out_dir, quick) -> path of report.md
    # wall time of the quick preset on a 2-core CPU, as measured by the run whose report is
    # committed under ltk/bench/results/ (rounded: ~15 s, ~1.2 min)
    quick_minutes: float

    @property
    def quick_duration(self) -> str:
        """`quick_minutes` as people read it: "~40 s" under a minute, "~1.2 min" from there."""
        seconds = self.quick_minutes * 60
        return f"~{round(seconds / 5) * 5} s" if seconds < 59.5 else f"~{self.quick_minutes:g} min"


def list_labs() -> list[Lab]:
    return [get_lab(name) for name in _LAB_MODULES]


def get_lab(name: str) -> Lab:
    if name not in _LAB_MODULES:
        raise ValueError(f"unknown lab {name!r}; available labs: {', '.join(_LAB_MODULES)}")
    return importlib.import_module(_LAB_MODULES[name]).LAB


def run_lab(name: str, out: str | Path | None = None, quick: bool = False) -> Path:
    """Run a lab into `out` (default runs/<name>/<UTC timestamp>) and return its report."""
    lab = get_lab(name)
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / name / stamp
    out = writable_dir(out, "--out")  # before the lab spends its minutes
    from ltk.labs.report import record_wall_time

    t0 = time.perf_counter()
    report = lab.run(out, quick)
    record_wall_time(report, time.perf_counter() - t0)
    return report
