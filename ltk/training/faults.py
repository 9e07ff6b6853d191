"""A crash on purpose, for the tests of restarts: LTK_FAULT="kill:LOCAL_RANK:STEP".

The rank with that local rank (on the node whose launcher has LTK_FAULT in its environment: a
test of several "nodes" gives it to one of them) sends itself SIGKILL right after it has trained
step STEP (before that step is logged or saved), as a segfault, an out-of-memory kill or a lost
node would end it: no Python handler runs, nothing is flushed. Only in the first attempt of a
torchrun job (TORCHELASTIC_RESTART_COUNT 0, or unset), so that the restarted ranks run through
and the test can check that they continued from the last good checkpoint
(tests/distributed/test_multinode.py). Unset, it costs one environment lookup per run.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "LTK_FAULT"


class Fault:
    def __init__(self, local_rank: int, step: int):
        self.local_rank, self.step = local_rank, step

    @classmethod
    def from_env(cls, local_rank: int) -> "Fault | None":
        """The fault this rank (by its local rank) is to suffer in this attempt, or None."""
        spec = os.environ.get(FAULT_ENV)
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return None
        kind, fault_rank, step = spec.split(":")
        if kind != "kill":
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill:LOCAL_RANK:STEP")
        return cls(int(fault_rank), int(step)) if int(fault_rank) == local_rank else None

    def after_step(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
