"""Where a run's metrics go: one small logger per sink, behind one interface.

    --trainer.log_to jsonl                     metrics.jsonl in the run folder (always written)
    --trainer.log_to jsonl,tensorboard         + <run>/tensorboard/ (tensorboard --logdir runs/)
    --trainer.log_to jsonl,wandb               + a W&B run under <run>/wandb/

Every logger takes the records the Trainer logs (one dict per logged step: step, loss, lr,
grad_norm, tokens, tokens_per_s, mfu, val_loss, val_bpb, ...) through `log(record)` and lets
go of its files and processes in `close()`. metrics.jsonl is the run folder's own record:
loss.png, summary.json and the labs read it, so it is written whatever `log_to` names.

The optional sinks are checked when the run is set up (`check_sinks`), before any data is
prepared or step taken: a name that is not a sink, or a sink whose package is missing, is an
error then, not after an hour of training. Only rank 0 logs (the Trainer opens no sink on
the other ranks).

W&B: `WANDB_MODE` (online, offline, disabled) is honoured. Left unset on a machine with no API
key (neither WANDB_API_KEY nor a .netrc entry), wandb would stop to ask for a login; the run is
logged offline instead (`wandb sync <run>/wandb/offline-run-*` uploads it later), and one line
says so.
"""
from __future__ import annotations

import importlib
import json
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from ltk.training.config import ConfigError

SINKS = ("jsonl", "tensorboard", "wandb")
_REQUIRES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> module that must import


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def parse_sinks(log_to: str) -> list[str]:
    """"jsonl,tensorboard" -> ["jsonl", "tensorboard"]; jsonl first and always; unknown names raise."""
    names = [s.strip().lower() for s in log_to.split(",") if s.strip()]
    unknown = [s for s in names if s not in SINKS]
    if unknown:
        raise ConfigError(f"unknown --trainer.log_to sink(s) {unknown}; valid sinks: {', '.join(SINKS)} "
                         "(a comma list, e.g. jsonl,tensorboard)")
    return ["jsonl", *dict.fromkeys(s for s in names if s != "jsonl")]


def check_sinks(log_to: str) -> list[str]:
    """The sinks of `log_to`, after checking that each one's package imports: a sink that cannot
    run here is a bad setting (ConfigError, naming the extra to install), found at start."""
    sinks = parse_sinks(log_to)
    for sink in sinks:
        module = _REQUIRES.get(sink)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--trainer.log_to {sink} needs the {module} package, which cannot be imported "
                              f"({e}): pip install \"llm-training-toolkit[{sink}]\"") from None
    return sinks


def open_loggers(sinks: list[str], run_dir: Path, config: dict[str, Any], name: str = "") -> "Loggers":
    """One logger per sink, writing into `run_dir` (which must exist); `config` is the run
    config as a dict (W&B stores it with the run)."""
    loggers = Loggers()
    try:
        for sink in sinks:
            if sink == "jsonl":
                loggers.add(JsonlLogger(run_dir / "metrics.jsonl"))
            elif sink == "tensorboard":
                loggers.add(TensorBoardLogger(run_dir / "tensorboard"))
            elif sink == "wandb":
                loggers.add(WandbLogger(run_dir, config, name or run_dir.name))
    except BaseException:
        loggers.close()  # the ones already open
        raise
    return loggers


class Loggers:
    """Several loggers as one: each record goes to all; close() closes every one, even when
    one of them fails to."""

    def __init__(self, loggers: list[Logger] | None = None):
        self.loggers: list[Logger] = list(loggers or [])

    def add(self, logger: Logger) -> None:
        self.loggers.append(logger)

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        errors = []
        for logger in reversed(self.loggers):
            try:
                logger.close()
            except Exception as e:  # noqa: BLE001 - the others must still close
                errors.append(e)
        self.loggers = []
        if errors:
            raise errors[0]


class JsonlLogger:
    """One JSON object a line, appended (a resumed run continues the same file), flushed at
    every record so a crash loses nothing that was logged."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers, without the step (the x axis) and without flags or nested values."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Each number of a record as a scalar at its step, in an event file under `folder`."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record.get("step"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> tuple[str | None, str | None]:
    """(mode to pass to wandb.init, or None to let WANDB_MODE decide; a note to print or None)."""
    if os.environ.get("WANDB_MODE"):
        return None, None
    if _has_wandb_key():
        return None, None
    return "offline", ("wandb: no API key (WANDB_API_KEY or `wandb login`) and WANDB_MODE unset: logging "
                       "offline; upload later with `wandb sync`")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A W&B run in `run_dir`/wandb, holding the run config; project from $WANDB_PROJECT."""

    def __init__(self, run_dir: Path, config: dict[str, Any], name: str):
        import wandb

        mode, note = wandb_mode()
        if note:
            print(note, file=sys.stderr)
        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT") or "llm-training-toolkit",
                              name=name, config=config, mode=mode)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record.get("step"))

    def close(self) -> None:
        self.run.finish()
