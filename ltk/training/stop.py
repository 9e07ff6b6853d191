"""Stopping a run on Ctrl-C or SIGTERM at a step boundary, so that its checkpoint resumes exactly.

A KeyboardInterrupt raised in the middle of a step leaves the data loader a micro-batch or more
ahead of the weights; a checkpoint saved then resumes past batches the model never trained on,
and the run no longer equals an uninterrupted one. So the first SIGINT or SIGTERM only raises a
flag: the step in flight finishes, the loop saves a checkpoint at that step boundary, and fit()
raises TrainingStopped (`ltk train` exits 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM). A
second Ctrl-C (or any signal after one) stops at once without saving; the last checkpoint stays
intact, because saves are atomic (ltk/training/checkpoint.py). A SIGTERM after a SIGTERM changes
nothing: schedulers repeat it, and Slurm signals a worker both directly and through torchrun.

Several processes: every rank must stop after the same step, or those that go on wait forever in
a collective. After each step the ranks all-reduce (max) their flags, one number next to a whole
step, so all see a request at the same step, even a rank the signal did not reach.

torchrun (torch 2.13) starts each worker in a session of its own, so a Ctrl-C at the terminal
reaches torchrun, not the workers. torchrun then sends that signal once to every worker and waits
for them up to --shutdown-timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default; raise it when
finishing a step and saving takes longer) before it SIGKILLs them; a second signal makes it send
SIGTERM, the workers' second signal. `ltk train --nproc N` starts torchrun in a session of its
own too and passes on each signal it gets (`run_forwarding_signals`), so each Ctrl-C reaches
every worker once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(KeyboardInterrupt):
    """The run stopped on a signal after a whole step, its checkpoint saved at that step."""

    def __init__(self, signum: int, step: int, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """While entered (in the main thread), the first SIGINT/SIGTERM sets `signum` for the loop to
    see at the next step boundary (`agreed`); a second raises KeyboardInterrupt at once, unless
    both are SIGTERM."""

    def __init__(self, rt, announce: bool = True):
        self.rt, self.announce = rt, announce
        self.signum = 0
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            if signal.SIGINT in (signum, self.signum):
                raise KeyboardInterrupt  # the second signal: stop now, without saving
            return
        self.signum = signum
        if self.announce:  # os.write: a print could land inside another print and raise
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                        "(Ctrl-C again stops at once, without saving)\n".encode())

    def agreed(self) -> int:
        """The signal every rank stops on after this step, or 0 to go on. A collective when the
        run has several processes: every rank calls it after every step."""
        if self.rt.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def run_forwarding_signals(cmd: list[str], **popen) -> int:
    """Run `cmd` in a session of its own (so the terminal's signals reach only this process) and pass
    on each SIGINT and SIGTERM it would have got (a SIGHUP as SIGTERM: save and stop). Returns 128 +
    the first signal passed on if `cmd` failed after it, else `cmd`'s exit status."""
    got: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        got.append(signum)
        for proc in procs:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    old = {s: signal.signal(s, forward) for s in (*SIGNALS, signal.SIGHUP)}
    try:
        procs.append(subprocess.Popen(cmd, start_new_session=True, **popen))
        for signum in got:  # those that came while it started
            procs[0].send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
        rc = procs[0].wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 + got[0] if got and rc != 0 else rc
