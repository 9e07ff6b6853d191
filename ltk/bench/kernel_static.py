"""kernel-static: every Triton kernel compiled for sm_90a (H100) and sm_80 (A100) on this CPU, read statically.

For each kernel of ltk/kernels/ (and Liger-Kernel's norms, SwiGLU, RoPE, cross-entropy, and the
tutorial matmul as the floor under NF4 and LoRA; ltk/bench/static_specs.py lists them), every
autotune candidate, fp16 and bf16, both targets: registers per thread and spill bytes (ptxas -v),
shared memory per CTA, resident CTAs per SM, and the instruction mix of the innermost loop of the
SASS (ltk/bench/sass.py: how loops are found and the hottest chosen), from which an issue-bound
ceiling as a fraction of the tensor-core peak.

Occupancy. CTAs per SM = min of four limits: 32 CTAs; 2048 threads / threads per CTA; registers
(allocated per warp in units of 256, i.e. regs/thread rounded up to 8, from 16384 per scheduler,
4 schedulers); shared memory (Triton's dynamic shared memory + 1 KiB the driver reserves per CTA,
from 228 KiB per SM on H100 and 164 KiB on A100). H100 SXM: 132 SMs, 64K registers and 2048
threads per SM. A100: 108 SMs, the same registers and threads.

Issue-bound ceiling (one simple model). An SM has 4 schedulers; each issues at most one warp
instruction per clock, and owns a quarter of the tensor cores: 1024 dense fp16/bf16 FLOP per clock
on H100 (989 TFLOP/s = 132 SMs × 4096 FLOP × 1.83 GHz), 512 on A100 (312 TFLOP/s = 108 × 2048 ×
1.41 GHz); TF32 at half that. For one warp's pass over the loop body, tensor time = its MMA FLOPs
(HGMMA: a quarter of the warpgroup's m·n·k product; HMMA: the warp's) / the scheduler's rate, and
issue time = the body's instruction count (every instruction, MMAs included, takes one slot).
The special-function unit (MUFU: exp2, rcp) serves a scheduler at 4 lanes per clock, so each
warp-wide MUFU instruction occupies it for 8 clocks (16 results/clock/SM on H100 and A100).
Since the tensor cores run while other instructions issue, an iteration takes at least
max(tensor, issue, 8·mufu) clocks, and

    ceiling = tensor / max(tensor, issue, 8·mufu)        (1.0: the loop can keep the tensor cores busy)

It ignores latency, dependencies, memory bandwidth and occupancy, so it is an upper bound: a
kernel below 1 cannot reach the peak whatever else goes right. mma.sync (HMMA) on H100 runs
below the wgmma rate, which the model does not charge. Kernels without MMAs (norms, elementwise)
have no ceiling; compare their instructions per element instead (memory-bound kernels need few).
Counts are static (each instruction of the body once), per thread = per warp.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ltk.bench import sass
from ltk.bench.harness import Row, write_csv


@dataclass(frozen=True)
class GPU:
    name: str
    cc: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    reserved_smem_per_cta: int = 1024
    tensor_flops_per_clk_sm: int = 4096  # dense fp16/bf16


TARGETS = {"sm_90a": GPU("H100", 90), "sm_80": GPU("A100", 80, smem_per_sm=164 * 1024, tensor_flops_per_clk_sm=2048)}
DTYPES = ("fp16", "bf16")


def resident_ctas(gpu: GPU, regs: int, smem: int, num_warps: int) -> tuple[int, str]:
    """(CTAs per SM, the limiting resource) from the limits in the module docstring."""
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    warps_by_regs = 4 * ((gpu.regs_per_sm // 4) // max(regs_per_warp, 1))
    limits = {"ctas": gpu.ctas_per_sm, "threads": gpu.threads_per_sm // (32 * num_warps),
              "regs": warps_by_regs // num_warps,
              "smem": gpu.smem_per_sm // (smem + gpu.reserved_smem_per_cta)}
    which = min(limits, key=limits.get)
    return limits[which], which


MUFU_CLOCKS = 8  # a warp-wide MUFU instruction on a scheduler's 4-lane special-function unit


def issue_ceiling(gpu: GPU, tensor_flops_per_warp: float, instructions: int, mufu: int = 0) -> float | None:
    """tensor / max(tensor, issue, 8·mufu) clocks per warp iteration; None without tensor-core work."""
    if tensor_flops_per_warp <= 0 or instructions <= 0:
        return None
    tensor = tensor_flops_per_warp / (gpu.tensor_flops_per_clk_sm / 4)
    return tensor / max(tensor, instructions, MUFU_CLOCKS * mufu)


# ---- compiling (in worker processes: the interpreter off, a fresh cache so ptxas runs and logs) ----

def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _unwrap(obj):
    """(the JITFunction, the autotuner or None) of a jit function or its autotune/heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    tuner = None
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # the interpreter's ends in a plain function
        if isinstance(obj, Autotuner) and tuner is None:
            tuner = obj
        obj = obj.fn
    return obj, tuner


def _resolve(target: str):
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@lru_cache(maxsize=None)
def _specs():
    from ltk.bench.static_specs import all_specs

    return all_specs()


def candidates(spec, dtype: str, arch: str = "sm_90a"):
    """The spec's candidates for target `arch`: its own (per-arch) list, or the autotuner's configs
    pruned as a launch would."""
    from ltk.bench.static_specs import Candidate

    fn, tuner = _unwrap(_resolve(spec.kernel))
    if spec.candidates is not None:
        return spec.candidates(dtype, arch)
    if tuner is None:
        return [Candidate({}, *spec.warps_stages)]
    configs = list(tuner.configs)
    if tuner.early_config_prune:
        consts = {k: v for k, v in spec.constexprs(dtype).items()}
        configs = tuner.early_config_prune(configs, {}, **consts)
    return [Candidate(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def compile_one(job: tuple[int, int, str, str]) -> dict:
    """Compile spec `i`'s candidate `j` in `dtype` for `arch`; its resources and loop mix, or an error."""
    i, j, dtype, arch = job
    spec = _specs()[i]
    cand = candidates(spec, dtype, arch)[j]
    out = dict(spec=i, candidate=cand.label, dtype=dtype, arch=arch, num_warps=cand.num_warps,
               num_stages=cand.num_stages)
    try:
        out.update(_compile(spec, cand, dtype, arch))
    except Exception as e:  # a spec out of date with its kernel: reported, the others go on
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return out


def _compile(spec, cand, dtype: str, arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, _ = _unwrap(_resolve(spec.kernel))
    given = {**spec.constexprs(dtype), **cand.kwargs}
    consts, sig = {}, {}
    for p in fn.params:
        if p.name in spec.ones and not p.is_constexpr:
            consts[p.name], sig[p.name] = 1, "constexpr"
        elif p.is_constexpr:
            if p.name in given:
                consts[p.name] = given[p.name]
            elif getattr(p, "has_default", False):
                consts[p.name] = p.default
            else:
                raise ValueError(f"the spec gives no value for the constexpr {p.name!r} of {spec.kernel}")
            sig[p.name] = "constexpr"
        elif p.name in spec.pointers:
            t = spec.pointers[p.name]
            sig[p.name] = "*" + (dtype if t == "T" else t)
        else:
            sig[p.name] = "fp32" if p.name in spec.floats else "i32"
    attrs = {(k,): [["tt.divisibility", 16]] for k, p in enumerate(fn.params)
             if sig[p.name].startswith("*") or p.name in spec.aligned}
    start, log = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", TARGETS[arch].cc, 32),
                           options=dict(num_warps=cand.num_warps, num_stages=cand.num_stages))
    seconds = time.perf_counter() - start
    usage = sass.parse_ptxas_log(log.getvalue()) if "registers" in log.getvalue() else _ptxas(k, arch)
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        text = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True, timeout=300).stdout
    insts = sass.parse_sass(text)
    loop = sass.hottest_innermost_loop(insts)
    gpu = TARGETS[arch]
    mix = sass.instruction_mix(insts, loop)
    flops = sass.tensor_flops_per_warp(insts, loop)
    ctas, limit = resident_ctas(gpu, usage["regs"], k.metadata.shared, cand.num_warps)
    units = spec.units({**consts, **cand.kwargs}, cand.num_warps) if spec.units else 32 * cand.num_warps
    return dict(regs=usage["regs"], spill_stores=usage.get("spill_stores", 0),
                spill_loads=usage.get("spill_loads", 0), smem=k.metadata.shared, ctas_per_sm=ctas,
                occupancy_limit=limit, loop="yes" if loop else "none (whole kernel)", mix=mix,
                tensor_flops_per_warp=flops, ceiling=issue_ceiling(gpu, flops, mix["total"], mix["mufu"]),
                per_unit=mix["total"] * 32 * cand.num_warps / units, compile_s=seconds, sass_total=len(insts),
                div64_calls=sum(i.base == "CALL" and "div" in i.callee for i in sass.body(insts, loop)))


def _ptxas(k, arch: str) -> dict:
    """ptxas -v on the kernel's PTX, when the compile came from a cache and logged nothing."""
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        run = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(Path(d) / "o")],
                             capture_output=True, text=True, timeout=600)
    return sass.parse_ptxas_log(run.stdout + run.stderr)


def _worker_init() -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # read once at import: the workers import triton after this
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ltk-static-")  # fresh: ptxas runs and logs
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True


# ---- the report ----

def _uncovered() -> list[str]:
    """@triton.jit functions of ltk/kernels/ that no spec launches and no other kernel calls."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import ltk.kernels

    launched = {_unwrap(_resolve(s.kernel))[0] for s in _specs()}
    out = []
    for info in pkgutil.iter_modules(ltk.kernels.__path__):
        mod = importlib.import_module(f"ltk.kernels.{info.name}")
        fns = {n: f for n, f in vars(mod).items() if isinstance(f, JITFunction)}
        for name, f in fns.items():
            called = any(g is not f and f"{name}(" in g.src for g in fns.values())
            if f not in launched and not called:
                out.append(f"ltk.kernels.{info.name}:{name}")
    return out


def run(kernels: str | None = None, archs: str = "sm_90a,sm_80", dtypes: str = "fp16,bf16",
        jobs: int = 2) -> list[Row]:
    """Compile and read every (spec, candidate, dtype, target); one Row each (see the module docstring).

    kernels: comma list of name prefixes (e.g. "nf4,attention.fwd"); None = all. archs: sm_90a,
    sm_80. dtypes: fp16, bf16. jobs: compiles run in this many processes."""
    arch_list = [a for a in archs.split(",") if a]
    dtype_list = [d for d in dtypes.split(",") if d]
    for a in arch_list:
        if a not in TARGETS:
            raise ValueError(f"unknown target {a!r}; known: {', '.join(TARGETS)}")
    for d in dtype_list:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    prefixes = [k for k in (kernels or "").split(",") if k]
    specs = _specs()
    chosen = [i for i, s in enumerate(specs) if not prefixes or any(s.name.startswith(p) for p in prefixes)]
    if not chosen:
        raise ValueError(f"no kernel matches {kernels!r}; known: {', '.join(s.name for s in specs)}")
    work = [(i, j, d, a) for i in chosen for d in dtype_list for a in arch_list
            for j in range(len(candidates(specs[i], d, a)))]
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the workers inherit it and import triton with it
    try:
        with multiprocessing.get_context("spawn").Pool(max(1, jobs), initializer=_worker_init) as pool:
            results = []
            for n, r in enumerate(pool.imap_unordered(compile_one, work), 1):
                results.append(r)
                print(f"[{n}/{len(work)}] {specs[r['spec']].name} {r['candidate']} {r['dtype']} {r['arch']}: "
                      f"{r.get('error') or str(r['regs']) + ' regs'}", file=sys.stderr)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    order = {job: k for k, job in enumerate(work)}
    results.sort(key=lambda r: (r["spec"], DTYPES.index(r["dtype"]), list(TARGETS).index(r["arch"]),
                                order.get((r["spec"], 0, r["dtype"], r["arch"]), 0), r["candidate"]))
    return report_rows(results, specs)


class StaticRows(list):
    """Rows plus the report's sections (written after the rows) and the CSV written beside."""

    sections: dict

    def write_beside(self, stem: Path) -> None:
        path = Path(f"{stem}.csv")
        if path.exists():
            path.unlink()
        write_csv(list(self), path)


def report_rows(results: list[dict], specs) -> StaticRows:
    rows = StaticRows()
    for r in results:
        spec = specs[r["spec"]]
        extra = {k: v for k, v in r.items() if k not in ("spec", "mix")}
        extra.update(kernel=spec.kernel, shape=spec.shape, unit=spec.unit, **r.get("mix", {}))
        rows.append(Row.stamped("cpu", op=spec.name, shape=r["candidate"], dtype=r["dtype"], mode=r["arch"],
                                provider=spec.provider, median_ms=0.0, p20_ms=0.0, p80_ms=0.0, runs=0,
                                throughput=r.get("per_unit"), throughput_unit=f"SASS/{spec.unit}",
                                pct_of_peak=None if r.get("ceiling") is None else 100 * r["ceiling"],
                                extra=json.dumps(extra, sort_keys=True)))
    rows.sections = sections(results, specs)
    return rows


HEADER = ("kernel | provider | candidate | regs | spills st/ld B | smem KiB | CTAs/SM | loop SASS | tensor | fp "
          "| int | mufu | ld tma/async/glob/shared | local | call | SASS per unit | ceiling")


def _line(r: dict, spec) -> str:
    if "error" in r:
        return f"| {spec.name} | {spec.provider} | {r['candidate']} | error: {r['error'].replace('|', '/')} |" + \
               " |" * (HEADER.count("|") - 3)
    m = r["mix"]
    unit = "thread" if spec.units is None else spec.unit
    ceil = "–" if r["ceiling"] is None else f"{100 * r['ceiling']:.0f}%"
    loop = m["total"] if r["loop"] == "yes" else f"{m['total']} (no loop)"
    return (f"| {spec.name} | {spec.provider} | {r['candidate']} | {r['regs']} "
            f"| {r['spill_stores']}/{r['spill_loads']} "
            f"| {r['smem'] / 1024:.0f} | {r['ctas_per_sm']} ({r['occupancy_limit']}) | {loop} | {m['tensor']} "
            f"| {m['fp']} | {m['int']} | {m['mufu']} | {m['ld_tma']}/{m['ld_async']}/{m['ld_global']}/{m['ld_shared']} "
            f"| {m['local']} | {m['call']} | {r['per_unit']:.1f} per {spec.unit if unit != 'thread' else 'thread'} "
            f"| {ceil} |")


def _table(results, specs) -> str:
    lines = ["| " + HEADER + " |", "|" + "---|" * (HEADER.count("|") + 1)]
    return "\n".join(lines + [_line(r, specs[r["spec"]]) for r in results])


def sections(results: list[dict], specs) -> dict:
    out = {}
    main = [r for r in results if r["arch"] == "sm_90a" and r["dtype"] == "bf16"]
    if main:
        out["Kernels, statically (sm_90a, bf16)"] = (
            "Every candidate of every kernel. regs: per thread; spills: ptxas's spill stores/loads per thread; "
            "CTAs/SM: resident CTAs (the limiting resource); loop SASS: instructions of the innermost loop's "
            "body (per thread, per iteration); tensor … call: its instruction mix; SASS per unit: loop "
            "instructions × threads / the work of one iteration (per thread: per k-step); ceiling: the "
            "issue-bound fraction of tensor-core peak (the model is in the method).\n\n" + _table(main, specs))
    rest = [r for r in results if r not in main]
    if rest:
        for arch in TARGETS:
            for dtype in DTYPES:
                part = [r for r in rest if r["arch"] == arch and r["dtype"] == dtype]
                if part:
                    out[f"Kernels, statically ({arch}, {dtype})"] = _table(part, specs)
    errors = [f"- {specs[r['spec']].name} {r['candidate']} {r['dtype']} {r['arch']}: {r['error']}"
              for r in results if "error" in r]
    out["Compile errors"] = "\n".join(errors) if errors else "- none"
    try:
        missing = _uncovered()
    except Exception as e:  # the kernels' package changed shape: say so, do not fail the report
        missing = [f"(could not list: {e!r})"]
    out["Kernels no spec covers"] = "\n".join(f"- {m}" for m in missing) if missing else "- none"
    out["Targets"] = "\n".join(
        ["| target | GPU | SMs×(regs, threads, CTAs, smem KiB) | reserved smem/CTA | tensor FLOP/clk/SM (bf16) |",
         "|---|---|---|---|---|"] +
        [f"| {a} | {g.name} | ({g.regs_per_sm}, {g.threads_per_sm}, {g.ctas_per_sm}, {g.smem_per_sm // 1024}) "
         f"| {g.reserved_smem_per_cta} B | {g.tensor_flops_per_clk_sm} |" for a, g in TARGETS.items()])
    return out
