"""The run folder: one run writes it at a time, and a new run never mixes into an old one.

    runs/x/
        .lock               while a run holds the folder: locked by it, naming it
        config.json         the run config (rewritten on resume)
        metrics.jsonl       one row per logged step
        checkpoints/step_*  (ltk/training/checkpoint.py)
        summary.json, timeline.json, timeline.png, profile/, memory/rank*.jsonl, memory.png

Why refuse a folder that holds a run: a second fresh run into it would write step_000001 beside
the old step_000003 and append a second step 1 to metrics.jsonl, and `--resume` or `ltk generate`
would then pick the old run's newest checkpoint. A fresh run starts in a folder without a run, or
with `overwrite`, which deletes the old run's files (only those: anything else in the folder
stays) once the lock is held.

Why a lock: two runs writing one folder at the same time delete each other's temporary checkpoint
folders (every save cleans `.tmp-*`) and interleave their metrics rows. `flock` on an open file
belongs to the open file, so the kernel drops it when the process ends, however it ends: a crashed
run leaves its `.lock` file behind but never a stale lock. The pid, host and start time written
into the file only name the holder in the error.

Why cut metrics.jsonl on resume: a run that crashed after logging step 7 but saving step 5 would,
resumed, log steps 6 and 7 a second time. Resuming cuts the file back to the checkpoint's step
(atomically: a new file renamed over the old one), so every step has one row.

Several processes: `ltk train --nproc N` claims the folder in the launching process before torchrun
starts, shares the lock with torchrun and names the folder in LTK_RUN_FOLDER_HELD for the ranks;
started by torchrun directly, rank 0 claims it and tells every rank the outcome, so all raise
the same error. A torchrun restart (--max-restarts) starts the ranks again with the same
environment: they find the folder held for them, as the first ones did.

Several nodes: only the launcher with --node-rank 0 claims the folder; the others name it held.
One lock per job is what the lock means (one run writes the folder), and one lock taken from
several hosts would not work: the second node would find it taken, and flock on a shared
filesystem is only as good as the filesystem's emulation of it (NFS maps it to byte-range locks,
Lustre mounted with localflock keeps it per host). What the other nodes do check, with every
rank, is that they see the same folder and its lock (ltk/training/shared_folder.py).

`--resume auto` (ltk/training/resume.py): checkpoints newer than the one it continues are those
it found damaged; the claim moves each aside to checkpoints/.corrupt-step_N (kept to be looked
at, ignored by every reader), so that no reader picks it and no history mixes. Finding no
checkpoint at all, it starts fresh in the folder even if the folder holds a run's files (a run
that crashed before its first save: metrics.jsonl is then cut back to nothing).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from ltk.training.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from ltk.training.run_plot import read_metrics
from ltk.training.writable import writable_reason

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCK = ".lock"
HELD_ENV = "LTK_RUN_FOLDER_HELD"  # set by a launcher that holds the folder for its ranks
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "summary.json", "timeline.json", "timeline.png",
             "profile", "memory", "memory.png", "adapter", "merged", "model")  # the last three: ltk finetune's


class RunFolderError(ValueError):
    """A run folder that this run may not write: in use, or holding another run."""


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[1])


class RunFolder:
    """A run folder and, once `lock()` succeeded, the lock on it (released by `release()`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None
        self._created: list[Path] = []  # the folder and the parents that lock() made, deepest first

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def lock(self) -> "RunFolder":
        try:
            self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            fd = self._open_lock() if fcntl is not None else None
        except OSError as e:  # the same words as every other unwritable output (ltk/training/writable.py)
            raise RunFolderError(f"--out {self.path}: cannot write there ({writable_reason(e)}); "
                                 "choose a folder you can write") from None
        if fd is None:
            return self
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self.fd = fd
        return self

    def _open_lock(self) -> int:
        while True:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said which"
                os.close(fd)
                raise RunFolderError(f"run folder {self.path} is in use by another run ({holder}); wait for it "
                                     "to end, or give this run another --out") from None
            try:  # the file we locked may have been removed by its last holder meanwhile: then lock the new one
                if os.stat(self.path / LOCK).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        """Unlock; the lock file goes (removed while still locked, see _open_lock), and so does a
        folder that this run created and left empty (a run refused or failed before writing)."""
        if self.fd is None:
            return
        (self.path / LOCK).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it (or someone else did)
                break

    def describe(self) -> str | None:
        """What run this folder holds, in a few words; None when it holds none."""
        present = [n for n in RUN_FILES if (self.path / n).exists()]
        if not present:
            return None
        ckpts = list_checkpoints(self.path)
        steps = [r["step"] for r in self._rows() if isinstance(r.get("step"), int)]
        parts = [f"checkpoints up to {ckpts[-1].name}" if ckpts else None,
                 f"metrics.jsonl up to step {max(steps)}" if steps else None]
        parts += [n for n in present if n not in ("checkpoints", "metrics.jsonl")]
        return ", ".join(p for p in parts if p) or ", ".join(present)

    def set_aside_after(self, resume_from: Path | None) -> None:
        """`--resume auto`: move each checkpoint newer than `resume_from` (all, if None) to
        checkpoints/.corrupt-<name>; each must fail verification, since auto continues the newest
        valid one (a valid one here is another history: refused). Call with the lock held."""
        after = _step(resume_from) if resume_from is not None else -1
        for ckpt in list_checkpoints(self.path):
            if _step(ckpt) <= after:
                continue
            try:
                verify_checkpoint(ckpt)
            except (CheckpointError, OSError, KeyError, TypeError):
                aside = ckpt.with_name(f".corrupt-{ckpt.name}")
                shutil.rmtree(aside, ignore_errors=True)
                ckpt.rename(aside)
                print(f"ltk train: warning: moved the damaged {ckpt.name} aside to {aside} (delete it when looked at)",
                      file=sys.stderr, flush=True)
                continue
            raise RunFolderError(f"{self.path} holds {ckpt.name}, a valid checkpoint after the one --resume auto "
                                 f"continues ({resume_from}): another run wrote it meanwhile; resume again")

    def check(self, resume_from: Path | None, overwrite: bool, auto: bool = False) -> None:
        """May this run write here? Resuming in the checkpoint's own folder: yes, unless that folder
        holds later checkpoints (two histories would mix). Anything else is a fresh start: the folder
        must hold no run, or `overwrite` deletes the old one. `auto` (--resume auto): damaged later
        checkpoints are moved aside first, and a fresh start may reuse a folder that holds no valid
        checkpoint. Call with the lock held."""
        if auto:
            if overwrite:
                raise RunFolderError("--resume auto continues the run in --out, --overwrite deletes it: give one")
            self.set_aside_after(resume_from)
            if resume_from is None:
                return  # the files of a run that never saved: rewritten; metrics cut back by the trainer
        own = resume_from is not None and resume_from.parent.name == "checkpoints" and \
            resume_from.parent.parent.resolve() == self.path.resolve()
        if own:
            if overwrite:
                raise RunFolderError(f"--overwrite would delete the run that --resume {resume_from} continues; "
                                     "drop --overwrite")
            later = [p.name for p in list_checkpoints(self.path) if _step(p) > _step(resume_from)]
            if later:
                raise RunFolderError(
                    f"{self.path} holds checkpoints after {resume_from.name} ({', '.join(later)}): continuing "
                    f"from {resume_from.name} here would mix two histories; resume the newest (--resume "
                    f"{self.path}), or continue from {resume_from.name} in a new folder (--out NEW)")
            return
        held = self.describe()
        if held is None:
            return
        if not overwrite:
            raise RunFolderError(
                f"--out {self.path} already holds a run ({held}); continue it with `ltk train --resume "
                f"{self.path}`, start over with --overwrite (deletes that run's files), or choose another --out")
        for name in RUN_FILES:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _rows(self) -> list[dict]:
        """metrics.jsonl's rows; a line cut short by a crash is skipped (run_plot.read_metrics)."""
        path = self.path / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []

    def trim_metrics(self, step: int) -> None:
        """Drop the rows logged after `step` (those of steps a resumed run trains again), atomically."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        keep = [r for r in self._rows() if not (isinstance(r.get("step"), int) and r["step"] > step)]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def claim_run_folder(path: str | Path, *, resume_from: Path | None = None, overwrite: bool = False,
                     auto: bool = False) -> RunFolder:
    """Lock `path` and check that this run may write it (RunFolder.check); the lock is held until
    `release()` (or the end of a `with` block)."""
    folder = RunFolder(path).lock()
    try:
        folder.check(resume_from, overwrite, auto)
    except BaseException:
        folder.release()
        raise
    return folder


def claim_for_ranks(path: str | Path, rt, *, resume_from: Path | None, overwrite: bool,
                    auto: bool = False) -> RunFolder:
    """claim_run_folder on rank 0, its outcome raised on every rank (a collective in multi-process
    runs). Nothing to claim where the launcher holds the folder (HELD_ENV; rank 0 still moves aside
    what --resume auto skipped); the others get a RunFolder without the lock. Then, with several
    processes, every rank checks that it sees the folder rank 0 writes (shared_folder.py)."""
    from ltk.training.shared_folder import check_shared_folder

    folder = RunFolder(path)
    held = os.environ.get(HELD_ENV) == str(folder.path.resolve())
    error = None
    if rt.is_main:
        try:
            if not held:
                folder = claim_run_folder(path, resume_from=resume_from, overwrite=overwrite, auto=auto)
            elif auto:
                folder.set_aside_after(resume_from)
        except (RunFolderError, OSError) as e:
            error = str(e)
    if rt.world_size > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunFolderError(error)
    try:
        check_shared_folder(folder.path, rt, resume_from)
    except BaseException:
        if folder.fd is not None:
            folder.release()
        raise
    return folder
