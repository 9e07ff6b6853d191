"""How long the command line takes to start: wall time of `python -m ltk --help` and friends.

Every command pays the start-up before it does anything, and `--help` is the first thing a new
user runs: it should answer at once, not after importing torch, Triton and every benchmark.
The parser is therefore built from data (ltk/bench/__init__.py names each benchmark's module
without importing it; each command imports its modules inside its handler).

Method: each command runs `repeats` times, each in a fresh interpreter (`sys.executable -m ltk
...`, importing the same `ltk` as this process), after one untimed run that warms the file cache; the
wall clock around the subprocess gives median, p20 and p80. One more run under
`python -X importtime` records whether the command imported torch and how long its imports
took (the interpreter's own count, less noisy than the wall clock). A `python -c pass` row is
the floor: what any Python command costs on this machine.

    ltk bench cli-startup
    ltk bench cli-startup --commands help,train-help,bench-help --repeats 20 --json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ltk
from ltk.bench.harness import Row, Timing

# the folder holding this `ltk` package: the children run there and find it first
ROOT = Path(ltk.__file__).resolve().parent.parent

COMMANDS = {
    "help": ["--help"],
    "train-help": ["train", "--help"],
    "bench-help": ["bench", "attention", "--help"],
}


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`argv` in a fresh process that imports this `ltk` (not one installed elsewhere, nor one
    in whatever folder the benchmark was started from: `-m` searches the working folder first)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=300, **kwargs)


def _time_once(argv: list[str]) -> float:
    """Milliseconds of wall time for one run of `argv` in a fresh process."""
    t0 = time.perf_counter()
    proc = _run(argv)
    ms = (time.perf_counter() - t0) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return ms


def import_report(args: list[str]) -> dict:
    """One run of `python -X importtime -m ltk ARGS`: whether torch was imported, which of our
    modules were, the total import time (ms) and the top-level import that cost the most."""
    proc = _run([sys.executable, "-X", "importtime", "-m", "ltk", *args], text=True)
    names, top = set(), {}  # every module imported; top-level ones -> cumulative microseconds
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header line
        raw = parts[2]
        names.add(raw.strip())
        if len(raw) - len(raw.lstrip()) == 1:  # nesting indents by two more spaces a level
            top[raw.strip()] = int(parts[1])
    if proc.returncode != 0:
        raise RuntimeError(f"python -X importtime -m ltk {' '.join(args)} exited with {proc.returncode}")
    return {"imports_torch": "torch" in names, "ltk_modules": sorted(n for n in names if n.split(".")[0] == "ltk"),
            "modules": len(names), "import_ms": sum(top.values()) / 1e3,
            "slowest_import": max(top, key=top.get) if top else None}


def run(*, commands: str = "help,train-help", repeats: int = 10) -> list[Row]:
    """Time each command of `commands` (comma list of help, train-help, bench-help) `repeats`
    times in fresh interpreters; one Row each, plus the `python -c pass` floor."""
    names = [c.strip() for c in commands.split(",") if c.strip()]
    bad = [c for c in names if c not in COMMANDS]
    if bad or not names:
        raise ValueError(f"unknown command(s) {bad}; choose from {', '.join(COMMANDS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from ltk.training.progress import progress

    cases = [("python -c pass", "python", [sys.executable, "-c", "pass"], None)]
    cases += [("ltk " + " ".join(COMMANDS[c]), "ltk", [sys.executable, "-m", "ltk", *COMMANDS[c]], COMMANDS[c])
              for c in names]
    rows = []
    bar = progress(total=len(cases) * (repeats + 1), desc="cli-startup", unit="run")
    for shape, provider, argv, args in cases:
        _time_once(argv)  # untimed: the file cache warms up
        bar.update(1)
        samples = []
        for _ in range(repeats):
            samples.append(_time_once(argv))
            bar.update(1)
        t = Timing.from_samples(samples)
        extra = {"argv": argv[1:], "python": sys.version.split()[0], "ltk": str(ROOT)}
        if args is not None:
            extra.update(import_report(args))
        rows.append(Row.stamped("cpu", op="cli-startup", shape=shape, dtype="-", mode="wall", provider=provider,
                                median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                extra=json.dumps(extra, sort_keys=True)))
    bar.close()
    return rows
