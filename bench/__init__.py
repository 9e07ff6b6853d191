"""Benchmarks: a registry of named benchmarks that each return rows of the results CSV.

    from bench import run_benchmark, rows_to_markdown
    print(rows_to_markdown(run_benchmark("train-step", batch_size=4)))

Each `Benchmark` declares its options (name, type, default, help), so a command line can
offer them without knowing any benchmark:

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="name")
    for b in BENCHMARKS.values():
        b.add_arguments(sub.add_parser(b.name, help=b.description))
    args = parser.parse_args()
    rows = run_benchmark(args.name, **BENCHMARKS[args.name].kwargs_from(args))

Only the options given on the command line reach `run`, so the defaults live in one place
(the `run` function's signature; `Option.default` repeats them for --help, and a test keeps
the two equal). The timing method, the CSV schema and the peaks are in bench/harness.py and
bench/peaks.py; the pytest-benchmark suites (`pytest bench/`) time the same steps.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from bench import train_step
from bench.harness import (Row, Timing, environment, read_csv, rows_to_json, rows_to_markdown,
                           time_fn, write_csv)
from bench.peaks import measure_peaks, peak_for


@dataclass(frozen=True)
class Option:
    """One keyword argument of a benchmark's `run`; on a command line `--name-with-dashes`."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str  # one line, shown by `ltk bench --help`
    run: Callable[..., list[Row]]
    options: tuple[Option, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per option; unset flags stay None and are left out by `kwargs_from`."""
        for o in self.options:
            parser.add_argument(o.flag, dest=o.name, type=o.type, default=None, choices=o.choices,
                                help=f"{o.help} (default: {o.default})")

    def kwargs_from(self, namespace: argparse.Namespace) -> dict:
        """The options set on the command line, as keyword arguments for `run`."""
        return {o.name: getattr(namespace, o.name) for o in self.options
                if getattr(namespace, o.name, None) is not None}

    def parse_args(self, argv: list[str]) -> dict:
        """Parse this benchmark's flags alone, e.g. ["--batch-size", "4"] -> {"batch_size": 4}."""
        parser = argparse.ArgumentParser(prog=f"ltk bench {self.name}", description=self.description)
        self.add_arguments(parser)
        return self.kwargs_from(parser.parse_args(argv))


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "train-step",
            "tokens/s of a full training step (fwd, loss, bwd, AdamW): our GPT vs transformers' GPT-2",
            train_step.run,
            (
                Option("preset", str, "gpt-debug", "model size preset from models.gpt.GPT_SIZES"),
                Option("vocab_size", int, None, "vocabulary (default: the preset's, or 2048 for gpt-debug)"),
                Option("batch_size", int, 8, "sequences per step"),
                Option("seq_len", int, None, "tokens per sequence (default: the preset's block_size)"),
                Option("dtype", str, "auto", "auto = fp32 on CPU, bf16 autocast on CUDA",
                       ("auto", "fp32", "bf16")),
                Option("rounds", int, 4, "rounds over the providers, in alternating order (ABBA)"),
                Option("seed", int, 1337, "seed of the weights and the token batches"),
                Option("min_time", float, 8.0, "timed seconds per provider, split over the rounds"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
            ),
        ),
    ]
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def run_benchmark(name: str, **kwargs) -> list[Row]:
    """Run the benchmark `name` with keyword options; unknown names and options raise,
    listing the valid ones (a typo must not silently run the default)."""
    bench = get_benchmark(name)
    known = {o.name for o in bench.options}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"benchmark {name!r} has no option(s) {sorted(unknown)}; options: {sorted(known)}")
    return bench.run(**kwargs)


__all__ = [
    "BENCHMARKS", "Benchmark", "Option", "Row", "Timing", "environment", "get_benchmark",
    "measure_peaks", "peak_for", "read_csv", "rows_to_json", "rows_to_markdown", "run_benchmark",
    "time_fn", "write_csv",
]
