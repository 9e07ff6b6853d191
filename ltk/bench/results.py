"""Result files: a benchmark run written as `ltk/bench/results/<what>_<device>_<date>.md`, with
the method, the exact command, the machine and versions, and the rows — so a number in
this repository can always be traced to how, where and with what it was measured.

`write_result` writes a benchmark's file; `parse_result` and `collect` read back every kind
kept there (benchmarks, lab reports from ltk/labs/report.py, GPU checks from ltk/bench/gpu_check.py)
into tables, commands, device and date — what ltk/bench/readme_results.py builds README from.
"""
from __future__ import annotations

import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ltk.bench.harness import Row, environment, rows_to_markdown


def result_filename(what: str, device_name: str, date: str) -> str:
    """e.g. ("train-step", "NVIDIA H200", "2026-11-29T...") -> "train-step_nvidia-h200_2026-11-29.md"."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:40] or "unknown"
    return f"{what}_{slug}_{date[:10]}.md"


def write_result(folder: str | Path, what: str, rows: list[Row], run_fn, device: str = "auto",
                 command: str | None = None) -> Path:
    """Write one result file into `folder` and return its path. `run_fn` is the benchmark's
    run function: the first paragraph of its module's docstring is the method. Rows may carry
    `sections` ({heading: markdown}, written after the rows) and `write_beside(stem)`, which
    writes files named like the result (stem + ".json", ".png")."""
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
    for title, body in getattr(rows, "sections", {}).items():  # a benchmark's own verdicts, after its rows
        text += f"\n## {title}\n\n{body}\n"
    skipped = getattr(rows, "skipped", None)  # sweeps name the providers that could not run
    if skipped is not None:
        lines = sorted({f"- {s.provider} ({s.point}): {s.reason}" for s in skipped})
        text += "\n## Skipped\n\n" + ("\n".join(lines) if lines else "- nothing") + "\n"
    out = Path(folder) / result_filename(what, env["device"], env["date"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    beside = getattr(rows, "write_beside", None)  # e.g. the full result as .json and a plot as .png
    if beside is not None:
        beside(out.with_suffix(""))
    return out


# ---- reading result files back ----
KINDS = ("benchmark", "lab", "gpu-check")  # the three writers, in the order README lists them
NAME = re.compile(r"^(?P<what>[a-z0-9][a-z0-9.-]*)_(?P<device>[a-z0-9][a-z0-9.-]*)_(?P<date>\d{4}-\d{2}-\d{2})\.md$")
TITLE = re.compile(r"^# (?P<title>.+) on (?P<device>.+) \((?P<date>\d{4}-\d{2}-\d{2})\)$")


@dataclass(frozen=True)
class Table:
    """One markdown table of a result file: the `## ` section above it, its header, its rows."""

    section: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def records(self) -> list[dict[str, str]]:
        return [dict(zip(self.header, row)) for row in self.rows]


@dataclass(frozen=True)
class ResultFile:
    path: Path
    kind: str  # benchmark | lab | gpu-check
    what: str  # from the file name
    device_slug: str  # from the file name: with `what`, the identity newer files replace
    date: str  # YYYY-MM-DD, stated in the file (and equal to the name's)
    device: str  # as the file states it
    commands: tuple[str, ...]
    tables: tuple[Table, ...]
    skipped: tuple[tuple[str, str], ...]  # (provider, reason) from a "## Skipped" list

    def table_with(self, *columns: str) -> Table | None:
        """The first table whose header has all `columns`."""
        return next((t for t in self.tables if all(c in t.header for c in columns)), None)


def _split_row(line: str) -> list[str]:
    """Cells of `| a | b |`. Writers separate cells with " | ", so a pipe inside a cell without
    spaces round it (the header "max |Δ| vs naive") stays in its cell."""
    inner = line.strip()[1:-1]
    return [c.strip() for c in re.split(r" \| ", f" {inner} ")]


def parse_result(path: str | Path) -> ResultFile:
    """Read one result file; raise ValueError naming it when its name or format is not one of
    the three known formats (see the module docstring)."""
    path = Path(path)

    def fail(why: str) -> ValueError:
        return ValueError(f"{path}: cannot read this result file: {why}")

    name = NAME.match(path.name)
    if name is None:
        raise fail("the name must be <what>_<device>_<YYYY-MM-DD>.md (lower case, no '_' inside a part)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise fail("the first line must be a '# ' title")
    tables, section, code, fenced, i = [], "", {}, False, 0
    skipped = []
    while i < len(lines):
        line = lines[i]
        # "- provider (point): reason" (write_result), "- part: provider [at point]: reason" (gpu_check)
        s = section == "Skipped" and (re.match(r"^- (\S+) \(.*?\): (.+)$", line)
                                      or re.match(r"^- [^:]+: (\S+)(?: at .*?)?: (.+)$", line))
        if s:
            skipped.append((s[1], s[2]))
        if line.startswith("```"):
            fenced = not fenced
            if fenced:
                code.setdefault(section, [])
        elif fenced:
            code[section].append(line)
        elif line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header = _split_row(line)
            n, rows, i = lines[i + 1].strip().count("|") - 1, [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(tuple(_split_row(lines[i])))
                i += 1
            for k, cells in enumerate([header, *rows]):
                if len(cells) != n:
                    raise fail(f"a table under '{section or lines[0]}' has {n} columns but its line {k + 1} "
                               f"has {len(cells)} cells: {' | '.join(cells)}")
            tables.append(Table(section, tuple(header), tuple(rows)))
            continue
        i += 1
    if fenced:
        raise fail("a code block is not closed")

    title = lines[0][2:].strip()
    if title.startswith("Lab: "):
        kind = "lab"
        measured = next((t for t in tables if t.section == "Measured on" and t.header == ("key", "value")), None)
        info = dict(measured.rows) if measured else {}
        if "date" not in info or "device" not in info:
            raise fail("a lab report needs a '## Measured on' key | value table with date and device")
        date, device, commands = info["date"][:10], info["device"], code.get("Reproduce", [])
    else:
        m = TITLE.match(lines[0])
        if m is None:
            raise fail("the title must be '# Lab: ...', '# WHAT on DEVICE (YYYY-MM-DD)' or "
                       "'# GPU check on DEVICE (YYYY-MM-DD)'")
        kind = "gpu-check" if m["title"] == "GPU check" else "benchmark"
        date, device = m["date"], m["device"]
        if kind == "gpu-check":
            commands = [c for ln in lines for c in re.findall(r"^Command: `(.+)`$", ln)]
        else:
            commands = next((v for k, v in code.items() if k.startswith("Command")), [])
    if date != name["date"]:
        raise fail(f"the file says it was measured on {date}, its name says {name['date']}")
    joined = re.sub(r"\\\n\s*", "", "\n".join(commands))  # shell continuation lines -> one command
    commands = tuple(c.strip() for c in joined.splitlines() if c.strip())
    if not commands:
        raise fail("no command found ('## Command' or '## Reproduce' code block, or 'Command: `...`')")
    return ResultFile(path, kind, name["what"], name["device"], date, device, commands, tuple(tables),
                      tuple(skipped))


def collect(folder: str | Path) -> list[ResultFile]:
    """Every result file of `folder`, the newest of each (what, device), sorted by kind then name."""
    newest: dict[tuple[str, str], ResultFile] = {}
    for path in sorted(Path(folder).glob("*.md")):
        r = parse_result(path)
        key = (r.what, r.device_slug)
        if key not in newest or r.date > newest[key].date:
            newest[key] = r
    return sorted(newest.values(), key=lambda r: (KINDS.index(r.kind), r.what, r.device_slug))
