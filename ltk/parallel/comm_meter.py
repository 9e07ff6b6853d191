"""What a training step sends, counted where torch.distributed is called: one yardstick for our
engines (ltk/parallel/dist.py's Comm) and PyTorch's FSDP2 alike, set against the plan's bytes.

    with CommMeter() as meter:          # patches torch.distributed's collectives, counts, restores
        trainer.train_step()
    meter.step_done()                   # this step's bytes by collective, then the next step's

Payload bytes per call, as ltk/parallel/dist.py STATS and ltk/parallel/cost.py count them:

    all_reduce, broadcast, send      the tensor
    isend                            the tensor; it is what batch_isend_irecv (the ring, torch
                                     pipelining) calls per send, and it is patched under both of
                                     its names, since P2POp checks its op against torch's own
    all_gather (single / into_tensor / list)   the gathered output (N times the input)
    reduce_scatter (single / tensor)           the input (N times the output)
    all_to_all_single                the local input
    recv                             nothing: the sender counts the message once

A collective of a single element — the logged loss, the gradient norm, an answer-token count, a
stop flag — is a *control* message: counted apart, never in the model's traffic the plan gives
(cost.zero_comm_bytes counts gradients and parameters).

Not seen from Python: torch DDP's reducer (it calls the process group from C++), DeepSpeed's
communication, and DTensor's functional collectives (torch-tp, fsdp2 x tp). `uncounted_groups`
names the plan's groups a run's engines hide; summary.json lists them under "not_counted" and
leaves the collectives they issue out of the comparison rather than report a wrong zero.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist

# function -> (collective, which argument is the payload: index or name); list arguments are summed
_PAYLOAD: dict[str, tuple[str, int, str]] = {
    "all_reduce": ("all_reduce", 0, "tensor"),
    "broadcast": ("broadcast", 0, "tensor"),
    "send": ("send", 0, "tensor"),
    "isend": ("send", 0, "tensor"),  # patched apart (__enter__); batch_isend_irecv calls it per send
    "all_gather_single": ("all_gather", 0, "output"),
    "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
    "all_gather": ("all_gather", 0, "tensor_list"),
    "reduce_scatter_single": ("reduce_scatter", 1, "input"),
    "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
    "all_to_all_single": ("all_to_all", 1, "input"),
}


def _nbytes(x: Any) -> tuple[int, int]:
    """(bytes, elements) of a tensor or a list of tensors."""
    ts = x if isinstance(x, (list, tuple)) else [x]
    ts = [t for t in ts if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts), sum(t.numel() for t in ts)


class CommMeter:
    """Counts the payload bytes of every collective issued while it is entered (re-entrant over
    steps: enter and leave it around each step). `step_done()` closes a step."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.current: dict[str, int] = defaultdict(int)
        self.control: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, int]] = []
        self._saved: dict[str, Callable] = {}
        self._isend: Callable | None = None

    def _counting(self, name: str, fn: Callable) -> Callable:
        op, index, keyword = _PAYLOAD[name]

        def call(*args, **kwargs):
            arg = args[index] if len(args) > index else kwargs.get(keyword)
            nbytes, numel = _nbytes(arg)
            (self.control if numel == 1 else self.current)[op] += nbytes
            return fn(*args, **kwargs)

        call.__wrapped__ = fn
        return call

    def __enter__(self) -> "CommMeter":
        if not self.enabled:
            return self
        for name in _PAYLOAD:
            fn = getattr(dist, name, None) if name != "isend" else None
            if fn is not None and name not in self._saved:
                self._saved[name] = fn
                setattr(dist, name, self._counting(name, fn))
        if self._isend is None:  # P2POp checks its op against distributed_c10d.isend: patch both names
            import torch.distributed.distributed_c10d as c10d

            self._isend = c10d.isend
            dist.isend = c10d.isend = self._counting("isend", self._isend)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        if self._isend is not None:
            import torch.distributed.distributed_c10d as c10d

            dist.isend = c10d.isend = self._isend
            self._isend = None

    def step_done(self) -> dict[str, int]:
        """This step's model traffic by collective (control messages kept apart); starts the next."""
        if not self.enabled:
            return {}
        step = dict(sorted(self.current.items()))
        self.steps.append(step)
        self.current.clear()
        return step

    def result(self) -> dict[str, Any]:
        """The last step's bytes, whether every step moved the same, and the control messages'
        bytes over all steps."""
        if not self.steps:
            return {}
        last = self.steps[-1]
        return {"per_step": last, "total_per_step": sum(last.values()),
                "steps_equal": all(s == last for s in self.steps[1:]), "steps": len(self.steps),
                "control_bytes": dict(sorted(self.control.items()))}


def uncounted_groups(cfg, world: int) -> list[str]:
    """The plan's groups whose collectives CommMeter cannot see for this run (module docstring):
    the data-parallel reduction of torch DDP (what `auto` picks without tensor parallelism) and
    DeepSpeed, and DTensor tensor parallelism (fsdp2 with tp > 1, torch-tp), whose functional
    collectives run inside torch's dispatcher, not through torch.distributed's Python functions."""
    p = cfg.parallel
    strategy = p.strategy
    if strategy == "auto":  # as ltk/parallel/strategy.py resolves it
        dp_cp = world // (p.tp * p.pp)
        strategy = "none" if dp_cp == 1 else "ddp" if p.tp > 1 or p.pp > 1 else "torch-ddp"
    out = []
    if strategy == "torch-ddp" or strategy.startswith("deepspeed-"):
        out.append("data_parallel")
    if strategy == "torch-tp" or (strategy == "fsdp2" and p.tp > 1):
        out.append("tensor_parallel")
    return out


def compare(measured: dict[str, Any], plan_comm: dict[str, dict[str, int]],
            uncounted: list[str] = ()) -> dict[str, Any]:
    """The measured step beside the plan's bytes (summed over the plan's groups: data, tensor,
    pipeline and context parallel), by collective, with their ratio. A collective that an
    uncounted group also issues is shown but left out of "equal" (the meter saw only part of it)."""
    planned: dict[str, int] = defaultdict(int)
    for group, ops in plan_comm.items():
        for op, b in ops.items():
            planned[op] += b if group not in uncounted else 0
    partial = {op for g in uncounted for op in plan_comm.get(g, {})}
    per_step = measured.get("per_step", {})
    rows = {op: {"measured": per_step.get(op, 0), "plan": planned.get(op, 0)}
            for op in sorted(set(planned) | set(per_step))}
    for op, r in rows.items():
        r["vs_plan"] = r["measured"] / r["plan"] if r["plan"] else None
        if op in partial:
            r["partly_counted"] = True
    equal = all(r["measured"] == r["plan"] for op, r in rows.items() if op not in partial)
    return {"by_collective": rows, "equal": equal}


def comm_summary(meter: CommMeter, cfg, world: int, dtype: str, seq_len: int) -> dict[str, Any]:
    """summary.json's "comm_per_step": this rank's measured step beside the plan of the run's own
    flags (ltk/training/memory_report.py plan_for_run), or why there is nothing to set it against."""
    from ltk.training.memory_report import plan_for_run

    out: dict[str, Any] = {"measure": "payload bytes of the collectives of one training step, rank 0 "
                                      "(ltk/parallel/comm_meter.py)", **meter.result()}
    try:
        p = plan_for_run(cfg, world, dtype, seq_len)
    except ValueError as e:  # a family or strategy the plan does not cover
        return {**out, "plan": None, "no_plan": str(e)}
    uncounted = uncounted_groups(cfg, world)
    return {**out, "plan": p["comm"], **({"not_counted": uncounted} if uncounted else {}),
            **compare(out, p["comm"], uncounted)}
