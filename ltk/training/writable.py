"""Output paths checked before any work: a run that trains for an hour and then cannot write
its results has wasted the hour, so every command that writes (train's run folder, finetune's
--out, a lab's --out, bench's --save-results and --csv) proves first that it can, by creating
the folder and a probe file in it. A failure is a ValueError naming the flag and the path,
which the CLI prints as one line (exit code 2).

Permission bits alone do not answer the question (root ignores them, a read-only mount or a
full disk does not show in them), so the probe really writes.
"""
from __future__ import annotations

import os
from pathlib import Path


def writable_reason(e: OSError) -> str:
    """Why `e` stopped a write, in a few words."""
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return "a file is in the way of the folder"
    return e.strerror or type(e).__name__


def _probe(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".ltk-write-probe-{os.getpid()}"  # one name per process: ranks probe at once
    probe.write_bytes(b"")
    probe.unlink()


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create the folder `path` (and its parents) and write and remove a probe file in it;
    return it. `flag` names the option the path came from, for the error message."""
    path = Path(path)
    try:
        _probe(path)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({writable_reason(e)}); "
                         "choose a folder you can write") from None
    return path


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Check that the file `path` can be appended to (or created), without changing it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    try:
        _probe(path.parent)
        if path.exists():
            with path.open("a"):  # opening to append writes nothing
                pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write the file ({writable_reason(e)})") from None
    return path
