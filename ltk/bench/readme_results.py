"""README's Results section, generated from the committed result files — never typed by hand.

    python -m ltk.bench.readme_results            # rewrite README.md between its result markers
    python -m ltk.bench.readme_results --check    # exit 1 when README.md is not what this gives

Every file `ltk/bench/results/<what>_<device>_<date>.md` is read and becomes one row: what, the
device and date the file itself states, the command that produced it, a headline figure, a
link. Three formats are read, one per writer:

    benchmark  ltk/bench/results.py `write_result`: "# what on DEVICE (DATE)", "## Command" (a code
               block), "## Machine", "## Rows" (op | shape | dtype | mode | provider | median ms ...)
    lab        ltk/labs/report.py `Report.write`: "# Lab: title", tables, "## Reproduce" (a code
               block), "## Measured on" (a key | value table holding the date and the device)
    gpu-check  ltk/bench/gpu_check.py `report`: "# GPU check on DEVICE (DATE)", "Command: `...`", a
               table of kernel checks (result PASS/FAIL) and the benchmark rows

Headlines are computed from the file's own table cells by a few small rules, chosen per `what`
in HEADLINES (`Compare` for ours against a baseline, `Listing`, `Range`, `Agree`, `Count`,
`Same` for lab tables). Cells are quoted as written; the only computed number is a ratio of two
quoted cells. A `what` with no rule, or a rule that finds nothing, gives "see file".

Newer files replace older ones of the same what and device (the date in the name decides). A
file that does not parse is an error naming it, so a malformed result cannot vanish silently.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from ltk.bench.results import ResultFile, collect

ROOT = Path(__file__).resolve().parents[2]  # the checkout: ltk/bench/readme_results.py
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GROUPS = (  # kind, heading, text when a kind has no file
    ("benchmark", "Benchmarks and runs", "No benchmark result committed yet."),
    ("lab", "Labs", "No lab report committed yet."),
    ("gpu-check", "GPU checks", "No GPU check committed yet: `python -m ltk.bench.gpu_check` on a CUDA "
                                "machine writes one into ltk/bench/results/."),
)


# ---- headline rules: each returns a list of text fragments, empty when it finds nothing ----

def _number(cell: str) -> float | None:
    """The leading number of a cell: "73.1 [71.4, 75.4]" -> 73.1, "4,080" -> 4080, "+0.06%" -> 0.06."""
    m = re.match(r"^\+?(-?[\d,]*\.?\d+(?:e[+-]?\d+)?)", cell.strip())
    return float(m[1].replace(",", "")) if m else None


def _first(cell: str) -> str:
    """The measured part of a cell: "73.1 [71.4, 75.4]" -> "73.1", "16.27 / 16.27" -> "16.27"."""
    return cell.split(" [")[0].split(" / ")[0].strip()


MODES = ("fwd+bwd", "step", "memory", "fwd", "bwd")  # which point of a sweep heads it, best first


@dataclass(frozen=True)
class Compare:
    """ours against base at one point of the provider table: per op, the last point (the
    largest of a sweep) in the best mode of MODES where both ran. metric "time": base median ms
    over ours (above 1: ours is faster); "memory": ours peak MB over base's (below 1: ours holds
    less). A provider with no row is named with the reason the file's Skipped list gives. The
    table is the first with a provider column (and an op column when `op` is given; under a
    heading starting with `section` when that is given); a provider cell "name (note)" is name."""

    ours: str
    base: str
    metric: str = "time"
    op: str | None = None
    shape: str | None = None
    section: str | None = None
    dtype: str | None = None

    def __call__(self, r: ResultFile) -> list[str]:
        col = {"time": "median ms [p20, p80]", "memory": "peak MB"}[self.metric]
        t = next((t for t in r.tables if "provider" in t.header and col in t.header
                  and (self.op is None or "op" in t.header)
                  and (self.section is None or t.section.startswith(self.section))), None)
        if t is None:
            return []
        keys = [k for k in ("op", "shape", "dtype", "mode") if k in t.header]
        varying = [k for k in keys if len({x[k] for x in t.records()}) > 1]  # what names a point
        recs = [{**x, "provider": x["provider"].split(" (")[0]} for x in t.records()
                if (self.op is None or x["op"] == self.op) and (self.shape is None or x.get("shape") == self.shape)
                and (self.dtype is None or x.get("dtype") == self.dtype)]
        reasons = {p: next((why for q, why in r.skipped if q == p), None) for p in (self.ours, self.base)
                   if not any(x["provider"] == p for x in recs)}
        if reasons:  # one of the two did not run: say why, where the file says
            return [f"{p}: not run ({why})" for p, why in reasons.items() if why]
        cells: dict[tuple[str, ...], dict[str, str]] = {}
        for x in recs:
            cells.setdefault(tuple(x[k] for k in keys), {})[x["provider"]] = x[col]

        def rank(point: tuple[str, ...]) -> int:
            mode = point[keys.index("mode")] if "mode" in keys else ""
            return MODES.index(mode) if mode in MODES else len(MODES)

        out = []
        for op in dict.fromkeys(p[0] if "op" in keys else "" for p in cells):
            both = [p for p, v in cells.items() if self.ours in v and self.base in v
                    and ("op" not in keys or p[0] == op)]
            if not both:
                continue
            point = [p for p in both if rank(p) == min(map(rank, both))][-1]
            o, b = _first(cells[point][self.ours]), _first(cells[point][self.base])
            no, nb = _number(o), _number(b)
            if not no or not nb:  # a 0 or a non-number: no ratio to give
                continue
            label = " ".join(point[keys.index(k)] for k in varying)
            unit = " ms" if self.metric == "time" else " MB"
            ratio = nb / no if self.metric == "time" else no / nb
            out.append(f"{label + ': ' if label else ''}{self.ours} {o}{unit} vs {self.base} {b}{unit}: {ratio:.2f}x")
        return out


@dataclass(frozen=True)
class Listing:
    """`value` of every row named by its `label` cell (up to a " ("), e.g. bits per byte per
    model; with `at_last`, only the rows whose `at_last` cell equals the last row's (largest N)."""

    value: str
    label: str
    at_last: str | None = None

    def __call__(self, r: ResultFile) -> list[str]:
        t = r.table_with(self.value, self.label, *([self.at_last] if self.at_last else []))
        if t is None or not t.rows:
            return []
        recs, where = t.records(), ""
        if self.at_last:
            last = recs[-1][self.at_last]
            recs, where = [x for x in recs if x[self.at_last] == last], f" at {self.at_last} = {last}"
        items = " · ".join(f"{x[self.label].split(' (')[0]} {_first(x[self.value])}" for x in recs)
        return [f"{self.value}{where}: {items}"]


@dataclass(frozen=True)
class Spills:
    """How many rows of the first table with a spills column spill (a cell other than "0/0"),
    naming their kernels: the kernel-static report's headline (its full table is README's
    "Kernels, statically")."""

    column: str = "spills st/ld B"

    def __call__(self, r: ResultFile) -> list[str]:
        t = r.table_with(self.column, "kernel")
        if t is None or not t.rows:
            return []
        bad = [x for x in t.records() if x[self.column] != "0/0"]
        names = ", ".join(dict.fromkeys(x["kernel"] for x in bad))
        return [f"{len(bad)} of {len(t.rows)} compiles in '{t.section}' spill" + (f": {names}" if names else "")]


@dataclass(frozen=True)
class Range:
    """The smallest, the (lower) median and the largest cell of a numeric column, as written."""

    column: str

    def __call__(self, r: ResultFile) -> list[str]:
        t = r.table_with(self.column)
        cells = [x[self.column] for x in t.records() if _number(x[self.column]) is not None] if t else []
        if not cells:
            return []
        cells.sort(key=_number)
        return [f"{self.column}: {cells[0]} to {cells[-1]} (median {statistics.median_low(cells)}, "
                f"{len(cells)} rows)"]


@dataclass(frozen=True)
class Agree:
    """In how many rows every "a / b" cell of `columns` has a == b (measured = plan); a row
    whose a is "—" was not measured. The words a and b come from the header's "(a / b)"."""

    columns: tuple[str, ...]

    def __call__(self, r: ResultFile) -> list[str]:
        t = r.table_with(*self.columns)
        words = re.search(r"\((\w+) / (\w+)\)", self.columns[0])
        if t is None or words is None or not t.rows:
            return []
        pairs = [[[s.strip() for s in x[c].split(" / ")] for c in self.columns] for x in t.records()]
        measured = [p for p in pairs if all(len(v) == 2 and v[0] != "—" for v in p)]
        equal = sum(all(a == b for a, b in p) for p in measured)
        names = ", ".join(re.sub(r"\s*\(.*\)", "", c) for c in self.columns)
        rest = len(pairs) - len(measured)
        return [f"{names}: {words[1]} = {words[2]} in {equal} of {len(measured)} rows"
                + (f" ({rest} not measured)" if rest else "")]


@dataclass(frozen=True)
class Count:
    """How many rows have `value` in `column`."""

    column: str
    value: str
    noun: str

    def __call__(self, r: ResultFile) -> list[str]:
        t = r.table_with(self.column)
        if t is None or not t.rows:
            return []
        k = sum(x[self.column] == self.value for x in t.records())
        return [f"{self.column} {self.value}: {k} of {len(t.rows)} {self.noun}"]


@dataclass(frozen=True)
class Same:
    """Whether every row has the same `column` (runs that must agree), and that value."""

    column: str

    def __call__(self, r: ResultFile) -> list[str]:
        t = r.table_with(self.column)
        if t is None or not t.rows:
            return []
        values = list(dict.fromkeys(x[self.column] for x in t.records()))
        if len(values) == 1:
            return [f"{self.column}: {values[0]} in all {len(t.rows)} rows"]
        return [f"{self.column}: {len(values)} different values over {len(t.rows)} rows"]


HEADLINES: dict[str, tuple] = {  # what -> its rules; a what not here gets "see file"
    "attention": (Compare("ours", "sdpa"), Compare("ours", "flash-attn")),
    "layernorm": (Compare("ours", "torch"), Compare("ours", "liger")),
    "rmsnorm": (Compare("ours", "torch"), Compare("ours", "liger")),
    "nf4": (Compare("ours", "bitsandbytes"), Compare("ours-reference", "bitsandbytes")),
    "lora": (Compare("ours", "peft"), Compare("ours-reference", "peft")),
    "qlora-memory": (Compare("ours", "bitsandbytes+peft", "memory", shape="total, checkpointing"),
                     Compare("ours", "bitsandbytes+peft", "memory", shape="total, no checkpointing")),
    "train-step": (Compare("ours", "transformers"),),
    "train-step-zoo": (Compare("ours", "transformers"),),
    "train-step-hf": (Compare("transformers+ours", "transformers"),
                      Compare("transformers+ours", "transformers", "memory"),
                      Compare("transformers+liger", "transformers")),
    "parallel-ddp": (Compare("ddp", "torch-ddp"), Compare("naive", "torch-ddp")),
    "parallel-ddp-4ranks": (Compare("ddp", "torch-ddp"), Compare("naive", "torch-ddp")),
    "parallel-zero": tuple(Compare(ours, base, dtype=dt) for dt in ("fp32", "bf16")
                           for ours, base in (("ours-zero3", "fsdp2"), ("ours-zero1", "deepspeed-zero1"),
                                              ("ours-zero2", "deepspeed-zero2"), ("ours-zero3", "deepspeed-zero3"))),
    "parallel-engines": (ENGINE_PAIRS := tuple(Compare(ours, base, op=op) for op, ours, base in (
        ("data parallel", "ddp", "torch-ddp"), ("ZeRO-1", "zero1", "deepspeed-zero1"),
        ("ZeRO-2", "zero2", "deepspeed-zero2"), ("ZeRO-3", "zero3", "fsdp2"), ("ZeRO-3", "zero3", "deepspeed-zero3"),
        ("tensor parallel", "tp", "torch-tp"), ("pipeline", "pp", "torch-pp")))),
    "parallel-engines-4ranks": ENGINE_PAIRS,
    "parallel-memory": (MEMORY_VERDICT := (Listing("x plan (goal <= 1.25)", "phase"),
                                           Listing("x 16Ψ (goal < 1)", "phase"))),
    "parallel-memory-fsdp2": MEMORY_VERDICT,
    "parallel-comm": (Agree(("bytes per step (measured / plan)",)),),
    "zero-overlap": (Compare("bucketed", "one-bucket"), Listing("exposed comm", "engine")),
    "cli-startup": (Listing("median ms [p20, p80]", "shape"),),
    "kernel-static": (Spills(),),
    "kernel-static-before": (Spills(),),  # the report before the kernel rewrites, kept to compare
    "parallel-cli": (Count("exit", "0", "runs"), Same("train loss step 1 -> 30"), Same("val loss")),
    "pretrain-lab": (Listing("val bits/byte", "model"),),
    "families-lab": (Listing("train FLOPs/token", "family"),),
    "zero-lab": (Listing("total MiB", "strategy", at_last="N"), Range("measured − model")),
    "parallelism-lab": (Agree(("model states MiB (measured / plan)", "MiB moved per step (measured / plan)")),),
    "pipeline-lab": (Range("measured / simulated"),),
    "scaling-lab": (Listing("tokens/s", "strategy", at_last="ranks"), Agree(("model states MiB/device (meas / sim)",))),
    "finetune-lab": (Listing("exact match before → after", "method"),
                     Listing("weights MiB (measured / plan)", "method"),
                     Listing("weights MiB per rank (measured / plan)", "engine x ranks")),
    "attention-lab": (Listing("peak MiB", "method", at_last="T"), Listing("memory slope", "method")),
    "long-context-lab": (Range("activations measured / plan"), Agree(("MiB sent per step (measured / plan)",))),
    "gpu-check": (Count("result", "PASS", "kernel checks"), Compare("ours", "sdpa", op="attention"),
                  Compare("ours", "flash-attn", op="attention"), Compare("ours", "torch", op="layernorm"),
                  Compare("ours", "torch", op="rmsnorm"), Compare("ours", "bitsandbytes", op="nf4-matmul"),
                  Compare("ours", "peft", op="lora-linear"), Compare("ours", "transformers", op="train-step"),
                  Compare("ours", "transformers", section="Train step"),
                  Compare("ours-compile", "transformers", section="Train step"),
                  Listing("MFU (% of peak)", "provider")),
}


def headline(r: ResultFile) -> str:
    """The headline of one result file by its rules in HEADLINES, or "see file"."""
    parts = list(dict.fromkeys(f for rule in HEADLINES.get(r.what, ()) for f in rule(r)))
    return "; ".join(parts) if parts else "see file"


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def render(results: list[ResultFile], base: Path) -> str:
    """The generated block, markers included, one table per kind; links relative to `base`."""
    out = [BEGIN, "<!-- generated by `python -m ltk.bench.readme_results` from ltk/bench/results/*.md: "
                  "edit those files and rerun it, never this block -->"]
    for kind, heading, empty in GROUPS:
        mine = [r for r in results if r.kind == kind]
        out += ["", f"### {heading}", ""]
        if not mine:
            out.append(empty)
            continue
        out += ["| what | device | date | command | headline | file |", "|---|---|---|---|---|---|"]
        for r in mine:
            link = Path(os.path.relpath(r.path, base)).as_posix()
            cmds = "<br>".join(f"`{_cell(c)}`" for c in r.commands)
            out.append(f"| `{r.what}` | {_cell(r.device)} | {r.date} | {cmds} | {_cell(headline(r))} | "
                       f"[{r.path.name}]({link}) |")
    out += ["", "`Nx` is the baseline's median time over ours (above 1: ours is faster) or, for memory, "
                "ours over the baseline's (below 1: ours holds less).", END]
    return "\n".join(out)


# ---- "Kernels, statically": the sm_90a/bf16 table of the newest kernel-static report ----
STATIC_BEGIN, STATIC_END = "<!-- kernels-static:begin -->", "<!-- kernels-static:end -->"
STATIC_SECTION = "Kernels, statically (sm_90a, bf16)"
STATIC_COLUMNS = ("kernel", "provider", "candidate", "regs", "spills st/ld B", "CTAs/SM", "loop SASS", "int", "call",
                  "SASS per unit", "ceiling")


def static_block(results: list[ResultFile], base: Path) -> str:
    """The generated block: the chosen columns of the newest kernel-static report's sm_90a/bf16
    table (every kernel and candidate), with its device, date and link; markers included."""
    out = [STATIC_BEGIN, "<!-- generated by `python -m ltk.bench.readme_results` from the newest "
                         "ltk/bench/results/kernel-static_*.md: rerun it, never edit this block -->", ""]
    mine = sorted((r for r in results if r.what == "kernel-static"), key=lambda r: r.date)
    table = next((t for t in mine[-1].tables if t.section == STATIC_SECTION), None) if mine else None
    if table is None:
        out.append("No kernel-static report committed yet: `ltk bench kernel-static --save-results "
                   "ltk/bench/results` writes one (a CPU is enough).")
    else:
        r = mine[-1]
        cols = [c for c in STATIC_COLUMNS if c in table.header]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_cell(rec[c]) for c in cols) + " |" for rec in table.records()]
        link = Path(os.path.relpath(r.path, base)).as_posix()
        out += ["", f"Compiled on {_cell(r.device)} ({r.date}), no GPU: `{r.commands[0]}`; every target, dtype "
                    f"and the full instruction mix in [{r.path.name}]({link})."]
    out.append(STATIC_END)
    return "\n".join(out)


def updated_readme(readme_text: str, block: str, readme: str | Path = "README.md", begin: str = BEGIN,
                   end: str = END) -> str:
    """`readme_text` with everything from `begin` to `end` replaced by `block`."""
    b, e = readme_text.count(begin), readme_text.count(end)
    if b != 1 or e != 1 or readme_text.index(begin) > readme_text.index(end):
        raise ValueError(f"{readme}: needs exactly one '{begin}' followed by one '{end}' "
                         f"(found {b} and {e}) in its Results section")
    head, rest = readme_text.split(begin)
    return head + block + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltk.bench.readme_results", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README differs from what the generator gives")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--results", type=Path, default=ROOT / "ltk" / "bench" / "results")
    args = p.parse_args(argv)
    try:
        results = collect(args.results)
        old = args.readme.read_text(encoding="utf-8")
        new = updated_readme(old, render(results, args.readme.parent), args.readme)
        if STATIC_BEGIN in new:  # the "Kernels, statically" table, where README has its markers
            new = updated_readme(new, static_block(results, args.readme.parent), args.readme, STATIC_BEGIN,
                                 STATIC_END)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new == old:
            print(f"{args.readme}: the Results section is up to date with {args.results}")
            return 0
        diff = difflib.unified_diff(old.splitlines(), new.splitlines(), "README.md", "generated", lineterm="", n=0)
        print("\n".join(list(diff)[:40]))
        print(f"{args.readme}: the Results section differs from what {args.results} gives; "
              "regenerate it with: python -m ltk.bench.readme_results", file=sys.stderr)
        return 1
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: Results section generated from {len(results)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
