"""`ltk train --nproc N`: run the same command in N local processes under torchrun, and report
a failure in the ranks' own words.

torchrun answers any failed rank with its ChildFailedError report: its own traceback and a box
per rank (time, host, pid, exit code) — some thirty lines after a bad setting that every rank
already named in one. So the pieces here split the work:

- a rank that refuses its input (the CLI's exit code 2) writes its one-line message into a
  folder the launcher names in LTK_RANK_ERRORS (`report_error`), instead of printing it;
- torchrun runs in a child process (`python -m ltk.training.launch`, taking torchrun's own
  arguments) that catches ChildFailedError and records only the first failed rank and how it
  ended (exit code or signal), without the report;
- the launcher (`launch`) then prints each distinct error once, `ltk train: error: ...`
  (with the ranks named when they disagree), and returns 2; for a rank that crashed instead,
  whose traceback is already on the terminal, it adds one line naming the rank and its end.

Started by hand (`torchrun ... -m ltk.cli train ...`), a rank prints its refusal itself, as
`ltk train [rank r]: error: ...`. The training output streams to the terminal as before.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ERRORS_ENV = "LTK_RANK_ERRORS"
_FAILURE = "failure.json"  # what the torchrun child records of the first failed rank


def report_error(cmd: str, message: str) -> None:
    """The CLI's one line for a refused input. In a multi-process run, a rank's line goes to the
    launcher's folder (it prints each distinct one once), else it carries the rank."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
    folder = os.environ.get(ERRORS_ENV)
    if world > 1 and folder:
        try:
            tmp = Path(folder) / f".rank{rank}.tmp"
            tmp.write_text(message)
            tmp.replace(Path(folder) / f"rank{rank}.txt")  # whole or absent, even if the rank is stopped
            return
        except OSError:
            pass  # the launcher has gone: say it here
    where = f" [rank {rank}]" if world > 1 else ""
    print(f"ltk {cmd}{where}: error: {message}", file=sys.stderr, flush=True)


def error_lines(folder: str | Path, cmd: str) -> list[str]:
    """One line per distinct message the ranks wrote into `folder`; the ranks are named only
    when they disagree (lowest rank first)."""
    found = sorted((int(f.stem[4:]), f.read_text()) for f in Path(folder).glob("rank*.txt"))
    by_message: dict[str, list[int]] = {}
    for rank, message in found:
        by_message.setdefault(message, []).append(rank)
    lines = []
    for message, ranks in by_message.items():
        where = "" if len(by_message) == 1 else f" [rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}]"
        lines.append(f"ltk {cmd}{where}: error: {message}")
    return lines


def launch(nproc: int | list[str], argv: list[str], cmd: str = "train", env: dict[str, str] | None = None,
           pass_fds: tuple[int, ...] = ()) -> int:
    """Run `ltk <argv>` in `nproc` local processes (gloo on a CPU, NCCL on GPUs), or under the torchrun
    arguments `nproc` is instead (a rendezvous of several nodes, restarts: ltk/training/rendezvous.py),
    with `env` added to the environment and `pass_fds` (the run folder's lock) kept open in torchrun;
    the exit code: 0, 2 when the ranks refused their input, 128 + the signal after a Ctrl-C or SIGTERM
    (passed on to torchrun once, ltk/training/stop.py), else the failed run's."""
    from ltk.training.stop import run_forwarding_signals

    torchrun = nproc if isinstance(nproc, list) else ["--standalone", f"--nproc_per_node={nproc}"]
    with tempfile.TemporaryDirectory(prefix="ltk-ranks-") as folder:
        args = [*torchrun, "-m", "ltk.cli", *argv]
        print("launching: torchrun " + " ".join(args), file=sys.stderr, flush=True)
        rc = run_forwarding_signals([sys.executable, "-m", "ltk.training.launch", *args],
                                    env={**os.environ, **(env or {}), ERRORS_ENV: folder}, pass_fds=pass_fds)
        if rc == 0:
            return 0
        errors = error_lines(folder, cmd)
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 2
        failure = Path(folder) / _FAILURE
        if failure.is_file():
            f = json.loads(failure.read_text())
            print(f"ltk {cmd}: rank {f['rank']} failed ({f['how']}); its output is above", file=sys.stderr)
        return rc


def _torchrun(argv: list[str]) -> int:
    """torchrun with `argv`, ending quietly: on a failed rank, record it and return its exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its "failed (exitcode ...)" and "closing signal" lines say again what the launcher says once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, f = e.get_first_failure()
        how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
        folder = os.environ.get(ERRORS_ENV)
        if folder:
            (Path(folder) / _FAILURE).write_text(json.dumps({"rank": rank, "how": how}))
        else:
            print(f"torchrun: rank {rank} failed ({how})", file=sys.stderr)
        return f.exitcode if f.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C or a kill: the ranks were stopped; no traceback
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
