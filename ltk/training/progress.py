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
             unit: str = "it", leave: bool = False, active: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled unless `active` (e.g. rank 0 only) and `progress_enabled()`;
    iterate it or call .update(). Other keyword arguments go to tqdm."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=not (active and progress_enabled()), dynamic_ncols=True, **kwargs)


class Steps:
    """One bar over the named steps of a slow job: it says which step runs now and how far the
    job is (a step that counts its own items draws a second bar under it).

        steps = Steps("data", 4)
        steps.begin("reading"); ...; steps.begin("cleaning"); ...; steps.close()
    """

    def __init__(self, desc: str, total: int):
        self.desc, self.current = desc, None
        # no rate or ETA: steps differ too much in length for either to mean anything
        self.bar = progress(total=total, desc=desc, bar_format="{desc}[step {n_fmt}/{total_fmt}, {elapsed}]")

    def begin(self, name: str) -> None:
        if self.current is not None:
            self.bar.update(1)
        self.current = name
        self.bar.set_description(f"{self.desc}: {name}")

    def close(self) -> None:
        if self.current is not None:
            self.bar.update(1)
        self.bar.close()


def ticking(items: Iterable[T], bar: tqdm) -> Iterator[T]:
    """Yield each item and advance `bar` once its loop body is done (a `continue` included):
    for an inner loop of a nested sweep counted on one bar."""
    for item in items:
        yield item
        bar.update(1)
