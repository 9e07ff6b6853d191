"""The lab registry: each lab answers one question with a table, a plot, and a few
sentences, written into its own run folder.

A lab module defines a `Lab` and registers it here. `ltk lab list` prints the registry;
`ltk lab run NAME [--quick]` calls `lab.run(out_dir, quick)` with a fresh timestamped
folder `runs/<lab>/<timestamp>/`. Every lab has a quick CPU preset (minutes, run in CI)
and a full preset meant for a GPU.
"""
from __future__ import annotations

import importlib
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
}


@dataclass
class Lab:
    name: str
    question: str  # the one question the lab answers
    run: Callable[[Path, bool], Path]  # (out_dir, quick) -> path of report.md
    quick_minutes: float  # rough duration of the quick preset on a 2-core CPU


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
    return lab.run(out, quick)
