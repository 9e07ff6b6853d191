"""`ltk bench parallel-comm`: the bytes each step of a real `ltk train` run sends, by collective,
beside what `ltk plan` says for the same flags — for every engine and parallel axis on gloo CPU
processes.

Each configuration is the command a user would type (`ltk train --preset gpt-debug --parallel S
--nproc N ...`, two steps of `grad_accum` micro-batches); the run's summary.json carries
`comm_per_step` (ltk/parallel/comm_meter.py: the payload of every torch.distributed call of a
step on rank 0, one-number control messages apart) and the plan of its own flags. A row is one
(run, collective): measured bytes / plan bytes. The goal is equality, byte for byte; a
collective the run's engines issue out of Python's sight (torch DDP's C++ reducer, DTensor's
functional collectives) is marked "not counted" and left out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ltk.bench.harness import Row

# name -> (ranks, `ltk train` flags); the defaults below add the preset, the batch and the steps
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "ddp": (2, ["--parallel", "ddp"]),
    "zero1": (2, ["--parallel", "zero1"]),
    "zero2": (2, ["--parallel", "zero2"]),
    "zero3": (2, ["--parallel", "zero3"]),
    "fsdp2": (2, ["--parallel", "fsdp2"]),
    "fsdp2 keep gathered": (2, ["--parallel", "fsdp2", "--parallel.reshard_after_forward", "false"]),
    "zero1 bf16, fp32 reduce": (2, ["--parallel", "zero1", "--trainer.dtype", "bf16",
                                    "--parallel.reduce_dtype", "fp32"]),
    "zero3 bf16": (2, ["--parallel", "zero3", "--trainer.dtype", "bf16"]),
    "tp + sp": (2, ["--parallel", "tp", "--parallel.tp", "2", "--parallel.sequence_parallel", "true"]),
    "cp ring": (2, ["--parallel", "ddp", "--parallel.cp", "2"]),
    "cp ulysses": (2, ["--parallel", "ddp", "--parallel.cp", "2", "--parallel.cp_impl", "ulysses"]),
    "torch-tp": (2, ["--parallel", "torch-tp"]),
    "ddp x tp": (4, ["--parallel", "ddp", "--parallel.tp", "2"]),
    "ddp x pp": (4, ["--parallel", "ddp", "--parallel.pp", "2"]),
    "ddp x pp (torch)": (4, ["--parallel", "ddp", "--parallel.pp", "2", "--parallel.pp_engine", "torch"]),
    "fsdp2 x tp": (4, ["--parallel", "fsdp2", "--parallel.tp", "2"]),
    "fsdp2 x pp (torch)": (4, ["--parallel", "fsdp2", "--parallel.pp", "2", "--parallel.pp_engine", "torch"]),
}
QUICK = ("ddp", "zero3", "fsdp2")


class CommRows(list):
    """The rows, plus the table the README's headline reads (`sections`) and the JSON beside the .md."""

    def __init__(self, rows: list[Row], result: dict[str, Any]):
        super().__init__(rows)
        self.result = result
        self.sections = {"Bytes per step": table(result["runs"]), "Train command": f"```\n{result['command']}\n```"}

    def write_beside(self, stem: Path) -> list[Path]:
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(self.result, indent=1))
        return [path]


def table(runs: list[dict[str, Any]]) -> str:
    """One line per (run, collective): payload bytes per step, measured / plan (exact), and MiB."""
    lines = ["| run | ranks | collective | bytes per step (measured / plan) | MiB measured |",
             "|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['world']} | — | — / — ({r['error']}) | |")
            continue
        for op, c in r["by_collective"].items():
            if c.get("partly_counted"):  # seen in part: another engine's share of it is out of sight
                lines.append(f"| {r['name']} | {r['world']} | {op} | — / {c['plan']} (not counted: "
                             f"{', '.join(r['not_counted'])}) | |")
            else:
                lines.append(f"| {r['name']} | {r['world']} | {op} | {c['measured']} / {c['plan']} | "
                             f"{c['measured'] / 2**20:.3f} |")
    return "\n".join(lines)


def train_args(preset: str, flags: list[str], world: int, steps: int, batch_size: int, grad_accum: int,
               seq_len: int, out: Path) -> list[str]:
    return ["--preset", preset, *flags, "--nproc", str(world), "--max-steps", str(steps),
            "--trainer.batch_size", str(batch_size), "--trainer.grad_accum", str(grad_accum),
            "--trainer.seq_len", str(seq_len), "--trainer.eval_every", "0", "--trainer.eval_batches", "1",
            "--trainer.ckpt_every", "0", "--trainer.keep_last", "1", "--trainer.timeline", "false",
            "--trainer.progress", "false", "--out", str(out), "--overwrite"]


def run_one(name: str, world: int, args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """One `ltk train` run; its summary's comm_per_step, or why there is none."""
    env = dict(os.environ, LTK_PROGRESS="0", CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "ltk.cli", "train", *args], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"name": name, "world": world, "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    summary = out / "summary.json"
    if done.returncode != 0 or not summary.exists():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return {"name": name, "world": world, "error": f"exit {done.returncode}: {last[0][:200]}"}
    comm = json.loads(summary.read_text())["comm_per_step"]
    return {"name": name, "world": world, "wall_s": wall, **comm}


def run(preset: str = "gpt-debug", configs: str | None = None, steps: int = 2, batch_size: int = 4,
        grad_accum: int = 2, seq_len: int = 64, out: str = "runs/bench-parallel-comm", quick: bool = False,
        timeout_s: float = 600.0) -> CommRows:
    """Every configuration (or the comma list `configs`; --quick: ddp, zero3, fsdp2), one `ltk train`
    run each, its measured bytes per step by collective beside the plan's."""
    names = list(QUICK if quick else CONFIGS) if configs is None else [c.strip() for c in configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(map(repr, unknown))}; known: {', '.join(CONFIGS)}")
    root = Path(out)
    runs = []
    for name in names:
        world, flags = CONFIGS[name]
        folder = root / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        args = train_args(preset, flags, world, steps, batch_size, grad_accum, seq_len, folder)
        r = run_one(name, world, args, folder, timeout_s)
        runs.append(r)
        state = r.get("error") or ("equal" if r["equal"] else "DIFFERS")
        print(f"parallel-comm: {name} x{world}: {state}", file=sys.stderr)
    command = ("ltk train " + " ".join(train_args(preset, ["FLAGS"], 0, steps, batch_size, grad_accum, seq_len,
                                                   Path(out) / "NAME"))).replace("--nproc 0", "--nproc N")
    result = {"preset": preset, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
              "seq_len": seq_len, "command": command, "flags": {n: CONFIGS[n][1] for n in names}, "runs": runs}
    root.mkdir(parents=True, exist_ok=True)
    (root / "parallel-comm.json").write_text(json.dumps(result, indent=1))
    rows = []
    for r in runs:
        for op, c in r.get("by_collective", {}).items():
            dtype = "bf16" if "bf16" in CONFIGS[r["name"]][1] else "fp32"
            rows.append(Row.stamped("cpu", op="parallel-comm", shape=f"{preset} {r['name']} x{r['world']}",
                                    dtype=dtype, mode=op, provider="measured", median_ms=0.0, p20_ms=0.0,
                                    p80_ms=0.0, runs=r["steps"], extra=json.dumps({**c, "wall_s": r["wall_s"]})))
    return CommRows(rows, result)
