"""Where the ranks of `ltk train` meet: one node (torchrun --standalone) or several.

    one node        ltk train ... --nproc 8
                    -> torchrun --standalone --nproc-per-node 8
    static          ltk train ... --nproc 8 --nnodes 4 --node-rank R --master-addr HOST [--master-port P]
                    -> torchrun --nnodes 4 --node-rank R --master-addr HOST --master-port P
    c10d            ltk train ... --nproc 8 --nnodes 4 --node-rank R --rdzv-endpoint HOST:PORT [--rdzv-id ID]
                    -> torchrun --nnodes 4 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID

In the static rendezvous each node's rank is the one given (global rank = node_rank · nproc +
local rank); in c10d the rendezvous hands them out in the order the nodes join, and the store
lives in the launcher on HOST. Both name --node-rank: the launcher with node rank 0 is the one
that claims the run folder (ltk/training/run_folder.py). c10d is the one for restarts across
nodes: when one node's agent restarts its workers (--max-restarts), it rejoins the rendezvous and
the others see a node waiting and restart theirs, so the whole group starts again together. A
static rendezvous has no such signal, and a restart of two static "nodes" hung here (the
restarted ranks never met): --max-restarts with --master-addr on several nodes is refused.
--rdzv-id, by default derived from the run folder, keeps two jobs on one endpoint apart.

--max-restarts K (torchrun's): a failed worker makes the agent stop the node's other workers and
start them all again, up to K times, with the same argv and environment. With `--resume auto`
they continue from the newest valid checkpoint (ltk/training/resume.py); without it they would
start again from step 0, so K > 0 requires it. With K > 0 the launcher also sets
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless it is set): by default (torch 2.13) the restarted
workers share the agent's rendezvous store with the first ones, without a prefix per attempt, and
gloo's rank 0 then reads the address of the *dead* rank 1 from it and fails to connect (seen
here; pytorch/pytorch#135712 reports the same for NCCL). With it set, each attempt's rank 0
hosts a fresh store.

--dist-timeout S: the process group's collective timeout (torch's defaults: 30 min on gloo,
10 min on NCCL), passed to the ranks in LTK_DIST_TIMEOUT (ltk/training/runtime.py). A rank that
hangs (not one that dies: its sockets close and the peers fail at once) takes the group down
after S seconds, gloo by raising in the collective, NCCL by its watchdog aborting the
communicator (torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 for its workers unless it is set).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

DIST_TIMEOUT_ENV = "LTK_DIST_TIMEOUT"
# the flags only the launcher reads (each takes a value): the ranks' argv drops them
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint",
                "--rdzv-id", "--max-restarts")


@dataclass
class Rendezvous:
    nproc: int = 1  # processes on this node
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0

    @classmethod
    def from_args(cls, args) -> "Rendezvous":
        """From `ltk train`'s flags, checked: a ValueError naming the flag otherwise."""
        r = cls(nproc=1 if args.nproc is None else args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                master_addr=args.master_addr, master_port=args.master_port, rdzv_endpoint=args.rdzv_endpoint,
                rdzv_id=args.rdzv_id, max_restarts=args.max_restarts)
        r.check(resume=args.resume)
        return r

    def check(self, resume: str | None) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc {self.nproc}: must be >= 1")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes {self.nnodes}: must be >= 1")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts {self.max_restarts}: must be >= 0")
        if self.max_restarts and resume != "auto":
            raise ValueError(f"--max-restarts {self.max_restarts} restarts the ranks with this same command, which "
                             "would train again from step 0: add --resume auto, so that they continue from the "
                             "newest checkpoint")
        if self.master_addr and self.rdzv_endpoint:
            raise ValueError("give --master-addr (static rendezvous) or --rdzv-endpoint (c10d), not both")
        if self.master_port is not None and not self.master_addr:
            raise ValueError("--master-port goes with --master-addr (static rendezvous)")
        if self.rdzv_id is not None and not self.rdzv_endpoint:
            raise ValueError("--rdzv-id goes with --rdzv-endpoint (c10d rendezvous)")
        if self.nnodes > 1:
            if self.max_restarts and self.master_addr:
                raise ValueError(f"--max-restarts {self.max_restarts} with --master-addr: a static rendezvous cannot "
                                 "restart a group of several nodes (the restarted ranks wait for each other forever); "
                                 "use the c10d rendezvous, --rdzv-endpoint HOST:PORT, instead")
            if not (self.master_addr or self.rdzv_endpoint):
                raise ValueError(f"--nnodes {self.nnodes}: name where the nodes meet, --master-addr HOST (and "
                                 "--master-port) or --rdzv-endpoint HOST:PORT, the same on every node")
            if self.node_rank is None:
                raise ValueError(f"--nnodes {self.nnodes}: give each node its --node-rank 0..{self.nnodes - 1} "
                                 "(node 0 claims the run folder; under Slurm: --node-rank $SLURM_NODEID)")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")

    def env(self) -> dict[str, str]:
        """What torchrun's environment needs besides ours (see the module docstring)."""
        if not self.max_restarts:
            return {}
        return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")}

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def launches(self) -> bool:
        """Does this command start torchrun (and not train in this process)?"""
        return self.world > 1 or self.max_restarts > 0

    @property
    def claims_folder(self) -> bool:
        """Node 0's launcher claims the run folder for the whole job (ltk/training/run_folder.py)."""
        return not self.node_rank

    def torchrun_args(self, out_dir: str) -> list[str]:
        """torchrun's arguments before the script."""
        args = [f"--nproc-per-node={self.nproc}"]
        if self.master_addr:
            args += [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank or 0}",
                     f"--master-addr={self.master_addr}", f"--master-port={self.master_port or 29500}"]
        elif self.rdzv_endpoint:
            rdzv_id = self.rdzv_id or "ltk-" + hashlib.sha1(str(out_dir).encode()).hexdigest()[:12]
            args += [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                     f"--rdzv-id={rdzv_id}"]
        else:
            args = ["--standalone", *args]
        if self.max_restarts:
            args.append(f"--max-restarts={self.max_restarts}")
        return args


def rank_argv(argv: list[str]) -> list[str]:
    """`argv` without the launcher's own flags (both `--flag V` and `--flag=V`): the ranks must not launch."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            rest.append(a)
    return rest


def dist_timeout() -> timedelta | None:
    """The collective timeout that --dist-timeout set for this process and its ranks; None: torch's default."""
    value = os.environ.get(DIST_TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={value!r}: expected seconds") from None
    if seconds <= 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV}={value!r}: must be > 0 seconds")
    return timedelta(seconds=seconds)
