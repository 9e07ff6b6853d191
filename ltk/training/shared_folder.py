"""Every rank sees the run folder: the check a multi-node run makes before it trains.

Checkpoints assume a shared filesystem: a sharded checkpoint is one folder into which every rank
writes its own file and rank 0 then hashes them all and renames the folder into place
(ltk/training/sharded_checkpoint.py), and a resume reads every rank's boxes from it. On nodes
that each see a local folder of the same name, rank 0 would find the other nodes' shards
missing at the first save, and a resume would start from whatever each node holds: hours into
a run, or never noticed. So the run checks it at the start, with every rank:

    rank 0:      writes a random token (16 bytes, hex) into <run>/.ltk-shared-check
    all ranks:   get the token from rank 0 (a broadcast), read the file, compare;
                 each also looks for <run>/.lock (the folder is claimed by this job's node 0);
                 all_gather (rank, host, what it saw, the checkpoint it resumes)
    all ranks:   raise the same error if any rank did not see the token or the lock, or if the
                 ranks resume from different checkpoints (--resume auto resolved per process)

The error names the folder and each rank and host that did not see it. On NFS a file closed on
one host is seen by an open on another (close-to-open consistency), so the read needs no wait.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

TOKEN = ".ltk-shared-check"


def check_shared_folder(path: str | Path, rt, resume_from: Path | None) -> None:
    """A collective with several processes (nothing with one): every rank sees the folder that rank 0
    writes, claimed, and resumes from the same checkpoint; a RunFolderError on every rank otherwise."""
    if rt.world_size == 1:
        return
    import torch.distributed as dist

    from ltk.training.run_folder import LOCK, RunFolderError, fcntl

    path = Path(path)
    box: list = [None]
    if rt.is_main:
        nonce = secrets.token_hex(16)
        try:
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / f"{TOKEN}.tmp"
            with open(tmp, "w") as f:
                f.write(nonce)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path / TOKEN)
            box = [("ok", nonce)]
        except OSError as e:
            box = [("error", f"rank 0 cannot write {path / TOKEN} ({e})")]
    dist.broadcast_object_list(box, src=0)
    status, nonce = box[0]
    if status == "error":
        raise RunFolderError(f"run folder {path}: {nonce}")
    try:
        seen = (path / TOKEN).read_text()
        problem = None if seen == nonce else "finds another run's token in it (a different folder of the same name)"
    except OSError as e:
        problem = f"cannot read rank 0's token in it ({type(e).__name__}: {e.strerror or e})"
    if problem is None and fcntl is not None and not (path / LOCK).exists():
        problem = "sees it, but no launcher holds it (no .lock): start exactly one node with --node-rank 0"
    mine = {"rank": rt.rank, "host": socket.gethostname(), "problem": problem, "path": str(path),
            "resume": resume_from.name if resume_from is not None else None}
    everyone: list = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    if rt.is_main:  # every rank has read it: the all_gather is past
        (path / TOKEN).unlink(missing_ok=True)
    blind = [m for m in everyone if m["problem"]]
    if blind:  # the same words on every rank: rank 0's folder, and where another rank's --out differs
        root = everyone[0]["path"]
        who = "; ".join(f"rank {m['rank']} on {m['host']}" + (f" (its --out: {m['path']})" if m["path"] != root else "")
                        + f" {m['problem']}" for m in blind)
        raise RunFolderError(
            f"run folder {root} is not shared by every rank: {who}. Checkpoints and metrics assume one "
            "filesystem seen by every node at the same path (NFS, Lustre, GPFS, ...): give every node the "
            "same --out on it")
    resumes = sorted({str(m["resume"]) for m in everyone})
    if len(resumes) > 1:
        by = "; ".join(f"rank {m['rank']} on {m['host']}: {m['resume'] or 'fresh start'}" for m in everyone)
        raise RunFolderError(f"the ranks would resume {everyone[0]['path']} from different checkpoints ({by}): the "
                             "nodes see different files; check that the filesystem is shared and not cached per node")
