"""A crash on purpose, for the tests of restarts: LTK_FAULT="kill:RANK:STEP".

The rank RANK sends itself SIGKILL right after it has trained step STEP (before that step is
logged or saved), as a segfault, an out-of-memory kill or a lost node would end it: no Python
handler runs, nothing is flushed. Only in the first attempt of a torchrun job
(TORCHELASTIC_RESTART_COUNT 0, or unset), so that the restarted ranks run through and the test
can check that they continued from the last good checkpoint (tests/distributed/test_restart.py).
Unset, it costs one environment lookup per run.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "LTK_FAULT"


class Fault:
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    @classmethod
    def from_env(cls, rank: int) -> "Fault | None":
        """The fault this rank is to suffer in this attempt, or None."""
        spec = os.environ.get(FAULT_ENV)
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return None
        kind, fault_rank, step = spec.split(":")
        if kind != "kill":
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill:RANK:STEP")
        return cls(int(fault_rank), int(step)) if int(fault_rank) == rank else None

    def after_step(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
