"""Run configs in files: `ltk train --config run.toml`, or a run's own config.json.

    # run.toml: any subset of the fields; this alone is a whole file
    preset = "llama-debug"      # optional: the base (else --preset, else gpt-debug)
    [trainer]
    max_steps = 200

Precedence, lowest first: the preset < the file < the named flags (--max-steps, --device, ...)
< the dotted overrides (--trainer.max_steps 300). A file is read by its suffix: .toml
(tomllib) or .json (what `ltk train --print-config` and every run folder's config.json hold),
and type-checked field by field (ltk/training/config.py); every error names the file, and the
line of a syntax error.

`--print-config toml` writes the resolved config with `to_toml`, a small writer of ours (the
standard library reads TOML but does not write it). TOML has no null: a field that is None is
written as the string "none", which reads back as None, as `--optim.decay_steps none` does on
the command line. `to_toml` output read back with `load_config` gives the same config.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import tomllib

from ltk.training.config import ConfigError, RunConfig, apply_dict

DEFAULT_PRESET = "gpt-debug"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The nested dict of a .toml or .json config file; errors name the file (and the line)."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"--config {path}: expected a .toml or .json file")
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a table of config sections, got a {type(d).__name__}")
    return d


def load_config(path: str | Path, preset: str | None = None) -> RunConfig:
    """The file's fields over its preset: the file's own `preset = "..."`, else `preset` (the
    --preset flag), else gpt-debug. Naming two different presets is an error, not a choice."""
    from ltk.training.config_check import check_model
    from ltk.training.presets import get_preset

    d = dict(read_config_file(path))
    own = d.pop("preset", None)
    if own is not None and not isinstance(own, str):
        raise ConfigError(f"{path}: preset must be a preset name, got {own!r}")
    if own and preset and own != preset:
        raise ConfigError(f"--preset {preset} and preset = {own!r} in {path} disagree: drop one")
    try:
        cfg = apply_dict(get_preset(own or preset or DEFAULT_PRESET), d)
        if "model" in d or "family" in d:  # absurd model fields fail here, naming the file
            check_model(cfg)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def config_from_dict(d: dict[str, Any], source: str | Path) -> RunConfig:
    """RunConfig.from_dict for a config read from `source` (a checkpoint's state.json, a run's
    config.json), with the source named in any error."""
    try:
        return RunConfig.from_dict(d)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


# -- writing TOML -------------------------------------------------------------------------
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def to_toml(d: dict[str, Any]) -> str:
    """A nested dict of scalars as TOML: the top-level scalars, then one [table] per section."""
    lines: list[str] = []
    _table(d, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(d: dict[str, Any], keys: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    if keys and (scalars or not d):
        lines += ["", "[" + ".".join(_key(k) for k in keys) + "]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
    for k, v in d.items():
        if isinstance(v, dict):
            _table(v, [*keys, k], lines)


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _value(v: Any) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest text that reads back as the same double; has a "." or an exponent
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def _string(s: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX) are TOML's; DEL must be escaped in TOML only
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")
