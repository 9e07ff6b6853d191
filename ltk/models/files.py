"""Reading the files a model or a run comes in (JSON, safetensors, tensor-only pickles), so that a
damaged or unsafe file is refused with one line that names it.

Hugging Face folders (ltk/models/hf/folder.py) and our checkpoints (ltk/training/checkpoint.py)
read the same three kinds of file, and the libraries' own errors do not say which file failed:
json says "Expecting value: line 2 column 7", safetensors "incomplete metadata, file not fully
covered", torch.load a page about miniz. Worse, when torch.load(weights_only=True) refuses a
pickle that holds more than tensors, its message advises weights_only=False, which runs whatever
code the pickle carries. Here the file is named, and an unsafe pickle is simply not loaded.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class BadFileError(ValueError):
    """A file that is not what its name says: invalid JSON, truncated or corrupt weights."""


class UnsafePickleError(BadFileError):
    """A pickle that holds objects other than tensors: unpickling it could run code."""


_JSON_KINDS = {dict: "object", list: "array"}


def read_json(path: str | Path, *, expect: type | None = dict):
    """The value of a JSON file (of type `expect`, if given); bad JSON names the file, line and column."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path} is not valid JSON: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if expect is not None and not isinstance(value, expect):
        kind = _JSON_KINDS.get(expect, expect.__name__)
        raise BadFileError(f"{path}: expected a JSON {kind}, got {type(value).__name__}")
    return value


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; a cut or garbled file names itself."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise BadFileError(f"{path} is truncated or corrupt: {e}") from None


# what torch's weights-only unpickler says when it meets something other than tensors
_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose module"
                      r"|(unrecognized function|Can only create new object|must be imported to load)")
_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")


def load_tensors_only(path: str | Path, *, mmap: bool = False):
    """torch.load(path, weights_only=True) on the CPU: tensors and plain containers only, so no code
    runs. A pickle holding other objects is refused with our own message (never torch's advice to
    set weights_only=False); a truncated or corrupt file names itself. mmap: tensors stay in the
    file, read page by page as they are used (a slice reads only its own bytes)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        refused = _REFUSED.search(msg)
        if refused:
            what = refused.group(1) or refused.group(2)
            raise UnsafePickleError(
                f"{path} holds objects other than tensors{f' ({what})' if what else ''}, so it is not loaded: "
                "unpickling them could run arbitrary code. If you trust its source, convert it to "
                "safetensors with a tool you trust and load that instead") from None
        reason = _REASON.search(msg)
        raise BadFileError(f"{path} is truncated or corrupt: {reason.group(1) if reason else 'not a pickle'}") from None
    except EOFError:
        raise BadFileError(f"{path} is truncated or corrupt: it ends early") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # these name the file already
    except (RuntimeError, OSError, IndexError, KeyError, ValueError) as e:  # what a cut or garbled file raises
        reason = str(e).split(". ")[0].strip()  # torch's first sentence; the rest is advice
        raise BadFileError(f"{path} is truncated or corrupt: {type(e).__name__}: {reason}") from None
