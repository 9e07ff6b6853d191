"""Result files: a benchmark run written as `bench/results/<what>_<device>_<date>.md`, with
the method, the exact command, the machine and versions, and the rows — so a number in
this repository can always be traced to how, where and with what it was measured.
"""
from __future__ import annotations

import inspect
import re
import shlex
import sys
from pathlib import Path

from bench.harness import Row, environment, rows_to_markdown


def result_filename(what: str, device_name: str, date: str) -> str:
    """e.g. ("train-step", "NVIDIA H200", "2026-11-29T...") -> "train-step_nvidia-h200_2026-11-29.md"."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:40] or "unknown"
    return f"{what}_{slug}_{date[:10]}.md"


def write_result(folder: str | Path, what: str, rows: list[Row], run_fn, device: str = "auto",
                 command: str | None = None) -> Path:
    """Write one result file into `folder` and return its path. `run_fn` is the benchmark's
    run function: the first paragraph of its module's docstring is the method."""
    env = environment(device)
    module_doc = inspect.getmodule(run_fn).__doc__ or ""
    method = module_doc.strip().split("\n\n")[0:3]
    command = command or "ltk " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    env_rows = "\n".join(f"| {k} | {v} |" for k, v in env.items())
    text = (
        f"# {what} on {env['device']} ({env['date'][:10]})\n\n"
        f"## Command\n\n```\n{command}\n```\n\n"
        f"## Method\n\n" + "\n\n".join(method) + "\n\n"
        f"## Machine\n\n| key | value |\n|---|---|\n{env_rows}\n\n"
        f"## Rows\n\n{rows_to_markdown(rows)}\n"
    )
    skipped = getattr(rows, "skipped", None)  # sweeps name the providers that could not run
    if skipped is not None:
        lines = sorted({f"- {s.provider} ({s.point}): {s.reason}" for s in skipped})
        text += "\n## Skipped\n\n" + ("\n".join(lines) if lines else "- nothing") + "\n"
    out = Path(folder) / result_filename(what, env["device"], env["date"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
