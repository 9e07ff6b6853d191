"""Memory by category: what one rank holds at the end of its first optimizer step, the moment
when gradients and optimizer states both exist, for Ψ parameters trained with AdamW in fp32:

    parameters        Ψ·4 bytes  (+ the model's buffers, e.g. rotary tables)
    gradients         Ψ·4 bytes  (ZeRO-2/3: Ψ·4/N, the rank's shard; our DDP: the flat buckets)
    optimizer_states  Ψ·8 bytes  (Adam's m and v, + 4 bytes per parameter tensor for the step
                                  counters; ZeRO-1/2/3: the rank's shard, + an fp32 master copy
                                  where the compute dtype is lower)
    activations       the peak, over the step, of the bytes autograd keeps saved for backward
                      (one micro-batch at a time with gradient accumulation, several in
                      flight under a pipeline schedule)

ZeRO's accounting (Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1: 2Ψ + 2Ψ + 12Ψ
for mixed-precision Adam, divided by N for the sharded parts) and the activation estimate
per layer sbh(34 + 5as/h) (Korthikanti et al. 2022, arXiv 2205.05198, section 4.1) are the
predictions ltk/parallel/cost.py makes; these are the measured figures to set beside them.
Every run's summary.json carries them under "memory" (rank 0's in a multi-process run); every
rank's peak per phase, beside the plan, is under "memory_per_rank" (ltk/training/memory_watch.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "trigger_wait"):  # an AsyncCollectiveTensor (DTensor TP's reduced outputs): its result
        t = t.trigger_wait()
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard


class _StorageBytes:
    """Sums storage sizes, each storage once across every call (tied weights, views, a
    gradient that is a view of a flat bucket); freed storages (resized to 0) count 0."""

    def __init__(self):
        self.seen: set[tuple[torch.device, int]] = set()

    def __call__(self, tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            st = _local(t).untyped_storage()
            key = (t.device, st.data_ptr())
            if st.nbytes() and key not in self.seen:
                self.seen.add(key)
                total += st.nbytes()
        return total


def _modules(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return [model] if isinstance(model, torch.nn.Module) else list(model)


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    masters = optimizer.masters() if hasattr(optimizer, "masters") else []  # mixed precision: the fp32 copy
    return [*masters, *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))]


def memory_by_category(model: torch.nn.Module | Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                       activations_bytes: int, device: torch.device | str | None = None,
                       grad_buffers: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes held now, each storage counted once, in the first category that claims it:

        parameters        the model's parameters and buffers
        gradients         `grad_buffers` (flat gradient buckets, of which .grad are views) and
                          the .grad tensors present now (0 before a backward, after zero_grad)
        optimizer_states  every tensor in optimizer.state (AdamW: exp_avg, exp_avg_sq, the
                          0-d step counters), and under mixed precision the fp32 masters
                          (ltk/parallel/mixed.py MasterOptimizer: ZeRO's K = 12)
        activations       `activations_bytes`, measured by the caller (see ActivationPeak)
        total             the sum of the four
        device_peak       on CUDA: torch.cuda.max_memory_allocated, the allocator's high-water
                          mark since its last reset (all of the above plus temporaries and the
                          allocator's rounding); in a run, MemoryWatch resets it where training
                          begins, so it covers the first step

    `model` may be a list of modules (a pipeline rank's chunks)."""
    if isinstance(activations_bytes, bool) or not isinstance(activations_bytes, int) or activations_bytes < 0:
        raise ValueError(f"activations_bytes must be a non-negative int, got {activations_bytes!r}")
    count, mods = _StorageBytes(), _modules(model)
    params = [p for m in mods for p in m.parameters()]
    out = {
        "parameters": count(params + [b for m in mods for b in m.buffers()]),
        "gradients": count([*grad_buffers, *(p.grad for p in params)]),
        "optimizer_states": count(_optimizer_tensors(optimizer)),
        "activations": activations_bytes,
    }
    return _finish(out, device)


def _finish(out: dict[str, int], device) -> dict[str, int]:
    out["total"] = sum(out.values())
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["device_peak"] = torch.cuda.max_memory_allocated(torch.device(device))
    return out


def run_memory(run: Any, activations_bytes: int, device: torch.device | str | None = None) -> dict[str, int]:
    """memory_by_category for one rank of a training run (ltk/parallel/strategy.py's ParallelRun or
    ltk/parallel/pipeline_run.py's PipelineRun): what *this rank* holds.

    An engine that keeps its state in flat shards (ZeRO-1/2/3) reports it itself through
    `engine.state_bytes()` (params incl. ZeRO-3's gathered buffers while they live, grads,
    optimizer = the fp32 master where it is not the parameter shard itself + Adam's moments,
    without the 0-d step counters); otherwise the storages of the rank's modules (a pipeline
    rank: its chunks), of its gradients (our DDP: its flat buckets) and of its optimizer state
    are summed."""
    engine = getattr(run, "engine", None)
    mods = _modules(run.chunks if hasattr(run, "chunks") else run.model)
    if engine is None or not hasattr(engine, "state_bytes"):
        buckets = [b for b in getattr(engine, "buffers", []) if torch.is_tensor(b)]
        return memory_by_category(mods, run.optimizer, int(activations_bytes), device, grad_buffers=buckets)
    s = engine.state_bytes()
    buffers = _StorageBytes()(b for m in mods for b in m.buffers())
    return _finish({"parameters": s["params"] + buffers, "gradients": s["grads"], "optimizer_states": s["optimizer"],
                    "activations": int(activations_bytes)}, device)


class _Saved:
    """What autograd holds instead of a saved tensor while ActivationPeak is on: the tensor
    itself, and a note to the tracker when autograd lets go of it (after its backward)."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor: torch.Tensor, key, tracker: "ActivationPeak"):
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self):
        self.tracker._release(self.key)


class ActivationPeak:
    """The peak bytes of tensors autograd keeps saved for backward while the context is on
    (saved-tensor hooks, torch.autograd.graph.saved_tensors_hooks), each storage once.

    A saved tensor counts from the forward op that saves it until autograd releases it after
    that op's backward, so gradient accumulation peaks at one micro-batch and a pipeline
    schedule at its micro-batches in flight. Tensors sharing storage with the model's
    parameters or buffers (a weight saved for dX = dY·Wᵀ, as itself or as a view) are model
    state, not activations. Counted: what autograd saves, including autocast's low-precision
    copies of weights; not counted: the block inputs a non-reentrant activation checkpoint
    keeps (its own hooks take the saved tensors inside a checkpointed block), temporaries that
    no backward needs. For one micro-batch the figure equals `saved_activations` (bytes saved
    over one forward).

    The hooks return the tensor unchanged (numerics are untouched); they cost a Python call
    per saved tensor only while on. torch.compile does not recompile for them (plain Python
    hooks are not inlined into graphs: dynamo's guard on saved-tensor hooks sees none)."""

    def __init__(self, model: torch.nn.Module | Sequence[torch.nn.Module]):
        self.mods = _modules(model)
        self.peak, self.live = 0, 0
        self._refs: dict[Any, list[int]] = {}  # storage -> [saved tensors alive, bytes]

    def __enter__(self) -> "ActivationPeak":
        state = [t for m in self.mods for t in (*m.parameters(), *m.buffers())]
        self._state = {(t.device, _local(t).untyped_storage().data_ptr()) for t in state}

        def pack(t: torch.Tensor):
            if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
                return t
            st = _local(t).untyped_storage()
            key = (t.device, st.data_ptr())
            if key in self._state or not st.nbytes():
                return t
            ref = self._refs.setdefault(key, [0, st.nbytes()])
            if ref[0] == 0:
                self.live += ref[1]
                self.peak = max(self.peak, self.live)
            ref[0] += 1
            return _Saved(t, key, self)

        def unpack(x):
            return x.tensor if isinstance(x, _Saved) else x

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self._hooks.__enter__()
        return self

    def _release(self, key) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]

    def __exit__(self, *exc) -> bool:
        self._hooks.__exit__(*exc)
        return False


class saved_activations:
    """Bytes of the tensors autograd saves for backward during a forward (each storage once):
    the activation memory of one micro-batch, measured on any device."""

    def __init__(self, model: torch.nn.Module):
        # weights saved for backward (dX = dY·W) are model state, not activations
        self._state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def __enter__(self):
        self.bytes, self._seen = 0, set(self._state)

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in self._seen:
                self._seen.add(st.data_ptr())
                self.bytes += st.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


class MemoryProbe:
    """Peak bytes by category of a training run's first step, for the run's summary:

        probe = MemoryProbe(run, device)
        for each step:
            with probe:           # does nothing once measured
                train_step()
        probe.result              # run_memory(...) with the step's activation peak

    The first step runs under ActivationPeak; a post-step hook on the optimizer reads the
    rank's state right after its first optimizer step, when gradients and optimizer states
    both exist (a step that fp16 loss scaling skips leaves the hook armed for the next).
    `detail`, when given, is called at that moment too and its dict kept under result["detail"]
    (fine-tuning: ltk/models/qlora.py memory_breakdown, frozen base / adapters / NF4 codes apart)."""

    def __init__(self, run: Any, device: torch.device | str | None = None, detail: Callable[[], dict] | None = None):
        self.run, self.device, self.detail = run, device, detail
        self.result: dict[str, int] | None = None
        self._acts: ActivationPeak | None = None
        self._handle = None
        self._first = True

    def __enter__(self) -> "MemoryProbe":
        if self.result is not None:
            return self
        if self._handle is None:
            # the torch optimizer that steps: DeepSpeed's wrapper steps ours inside (deepspeed_engine.py)
            stepping = getattr(getattr(self.run, "engine", None), "inner", None) or self.run.optimizer
            self._handle = stepping.register_step_post_hook(self._measure)
        if self._first:
            mods = self.run.chunks if hasattr(self.run, "chunks") else self.run.model
            self._acts = ActivationPeak(mods).__enter__()
        return self

    def _measure(self, optimizer, args, kwargs) -> None:
        if self.result is None:
            self.result = run_memory(self.run, self._peak, self.device)
            if self.detail is not None:
                self.result["detail"] = {**self.detail(), "activations": self._peak}

    @property
    def _peak(self) -> int:
        return self._acts.peak if self._acts is not None else 0

    def __exit__(self, *exc) -> bool:
        if self._first:
            self._first = False
            if self._acts is not None:
                self._acts.__exit__(*exc)
        if self.result is not None and self._handle is not None:
            self._handle.remove()  # not inside the hook: the optimizer is iterating its hooks then
            self._handle = None
        return False
