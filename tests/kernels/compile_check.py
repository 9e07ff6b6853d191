"""What the kernel test files share: the compile-for-a-GPU check, its register and spill
figures, and output poisoning.

The interpreter is lax about types and shapes, the compiler is not, so each kernel test file
has a `_compile_all()` that compiles its kernels, as the launchers configure them, down to a
cubin for sm_90; `compile_in_subprocess` runs it in a fresh process with the interpreter off
(TRITON_INTERPRET is read once, at import). Exit code 3 means this Triton's compiler API
cannot be driven directly: a skip with its reason, not a failure.

`compile_with_usage` compiles one kernel and reads ptxas's own report of it (registers per
thread, spill bytes): a kernel that spills keeps part of its state in local memory, one
round trip to L1/L2 per spilled value, which no autotune candidate should.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ltk.kernels.poison import poison_outputs  # noqa: F401  (the tests' one poisoning helper)


def require_nvidia_compiler():
    """(GPUTarget, ASTSource) of this Triton's NVIDIA compiler, for a `_compile_all()`; where its
    Python API cannot be driven directly, say why and exit with code 3 (a skip, below)."""
    try:  # the compiler's Python API moves between Triton versions
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        assert "nvidia" in backends
    except (ImportError, AssertionError) as e:
        print(f"cannot drive this Triton's NVIDIA compiler directly: {e!r}")
        sys.exit(3)
    return GPUTarget, ASTSource


def compile_in_subprocess(test_file: str, tmp_path: Path) -> None:
    pytest.importorskip("triton")
    path = Path(test_file)
    code = f"import sys; sys.path.insert(0, {str(path.parent)!r}); import {path.stem} as t; t._compile_all()"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-4000:]


def compile_with_usage(src, target, options: dict | None = None):
    """(compiled kernel, {"registers": per thread, "spill_bytes": stores + loads}) for a
    triton.compiler.ASTSource: ptxas runs with -v (it always does) and Triton prints its log
    when asked; the compile bypasses the cache, where no ptxas would run."""
    import triton
    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = triton.compile(src, target=target, options=options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert regs and spills, f"no ptxas report in the compile's log:\n{text[-2000:]}"
    return kernel, {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) + int(spills.group(2))}
