"""What the kernel test files share: the compile-for-a-GPU check and output poisoning.

The interpreter is lax about types and shapes, the compiler is not, so each kernel test file
has a `_compile_all()` that compiles its kernels, as the launchers configure them, down to a
cubin for sm_90; `compile_in_subprocess` runs it in a fresh process with the interpreter off
(TRITON_INTERPRET is read once, at import). Exit code 3 means this Triton's compiler API
cannot be driven directly: a skip with its reason, not a failure.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_in_subprocess(test_file: str, tmp_path: Path) -> None:
    pytest.importorskip("triton")
    path = Path(test_file)
    code = f"import sys; sys.path.insert(0, {str(path.parent)!r}); import {path.stem} as t; t._compile_all()"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-4000:]


@contextlib.contextmanager
def poison_outputs(module):
    """Set `module.POISON_OUTPUTS` for the block: every output buffer starts as NaN, so an
    element a kernel forgets to write fails the comparison."""
    old, module.POISON_OUTPUTS = module.POISON_OUTPUTS, True
    try:
        yield
    finally:
        module.POISON_OUTPUTS = old
