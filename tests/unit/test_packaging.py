"""Packaging: one top-level import name (`ltk`), good neighbours with Hugging Face's `kernels`."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_only_ltk_is_installed_at_top_level():
    """Every package the distribution installs lives under `ltk.`: a top-level `kernels` or
    `models` would collide with Hugging Face's `kernels` and with a user's own folders."""
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"])
    assert "ltk.kernels" in packages and "ltk.models.hf" in packages
    assert {p.split(".")[0] for p in packages} == {"ltk"}
    # and no importable package is left at the repository root (it would shadow on `python -m`)
    stray = [d.name for d in ROOT.iterdir() if (d / "__init__.py").exists()]
    assert stray == ["ltk"], stray


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_hugging_face_kernels_beside_ours():
    """transformers >= 5.25 requires Hugging Face's `kernels`; from the repository root (where the
    tests and README commands run) both must import and transformers must find its own."""
    pytest.importorskip("transformers")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (pip install kernels); nothing to collide with")
    code = ("import kernels, ltk.kernels, ltk.kernels.attention\n"
            "from transformers import AttentionInterface\n"
            "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "assert ltk.kernels.__file__.endswith('ltk/kernels/__init__.py'), ltk.kernels.__file__\n"
            "print('ok')")
    r = _run(code, ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_python_m_ltk_from_a_folder_with_its_own_models_package(tmp_path):
    """A user's project with `models/`, `training/` or `kernels/` folders must not shadow ours."""
    for name in ("models", "training", "parallel", "kernels"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user\\'s own package')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "ltk", "plan", "--preset", "gpt-debug", "--world", "2",
                        "--strategy", "zero3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "zero3" in r.stdout.lower()


def test_torch_requirement_admits_2_13():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(torch_req.removeprefix("torch"))
