import importlib.metadata
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_version_stays_below_hub_kernels_threshold():
    """transformers turns on Hugging Face's hub-kernel loader for a `kernels` distribution
    at >= 0.18; our `kernels` package must never be mistaken for it."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) < (0, 18)


def test_transformers_does_not_take_our_kernels_for_the_hub_loader():
    pytest.importorskip("transformers")
    try:
        importlib.metadata.version("kernels")
        pytest.skip("Hugging Face's `kernels` distribution is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()


def test_torch_requirement_admits_2_13():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(torch_req.removeprefix("torch"))
