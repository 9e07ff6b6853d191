"""Progress bars for the slow steps (data preparation, lab runs, benchmark sweeps), on stderr.

A bar is for a person watching a terminal: it is drawn only when stderr is one, so test output,
logs and `--json` output (stdout) stay clean. `LTK_PROGRESS=0` turns every bar off, `LTK_PROGRESS=1`
draws them even into a file or pipe.

    from ltk.training.progress import progress
    for path in progress(files, desc="reading", unit="file"):
        ...
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
ENV = "LTK_PROGRESS"


def progress_enabled() -> bool:
    """$LTK_PROGRESS when set (0/false/no/off or anything else), else whether stderr is a terminal."""
    value = os.environ.get(ENV, "").strip().lower()
    if value:
        return value not in ("0", "false", "no", "off")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, desc: str | None = None, total: int | None = None,
             unit: str = "it", leave: bool = False) -> tqdm:
    """A tqdm bar on stderr, disabled unless `progress_enabled()`; iterate it or call .update()."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=not progress_enabled(), dynamic_ncols=True)


def ticking(items: Iterable[T], bar: tqdm) -> Iterator[T]:
    """Yield each item and advance `bar` once its loop body is done (a `continue` included):
    for an inner loop of a nested sweep counted on one bar."""
    for item in items:
        yield item
        bar.update(1)
