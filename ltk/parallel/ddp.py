"""Data parallelism from scratch on torch.distributed: a naive engine, then the bucketed and
overlapped one (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB, §3).

Why averaging gradients is exact. N ranks split a global batch of B rows, B/N each; rank r
computes ℓ_r, the mean loss over its own rows. The global mean loss is

    L = (1/B) Σ_i ℓ_i = (1/N) Σ_r ℓ_r      so      ∇L = (1/N) Σ_r ∇ℓ_r

(differentiation is linear). An all-reduce (sum) of the local gradients divided by N therefore
gives every rank the gradient of the global mean loss. Replicas that start equal (parameters
broadcast from rank 0) and apply the same optimizer step to the same gradient stay equal, so no
parameter ever travels again. Gradient accumulation over m micro-batches is a sum too, and sums
commute with the all-reduce: accumulate locally (`no_sync`), reduce once per step.

NaiveDDP reduces after backward, one all-reduce per parameter tensor. With an α + β·bytes cost
per call (latency α, inverse bandwidth β) a model of P tensors and Ψ gradient bytes pays
P·α + β·Ψ, and nothing overlaps: the network idles during backward, the CPU/GPU during the
reduction.

DDP fixes both (§3.2.3):
  * buckets: gradients are packed into flat buffers of about `bucket_cap_mb` (25 MiB, as torch)
    and reduced one bucket per call: K·α + β·Ψ with K ≪ P. Small collectives are latency-bound
    (the paper's figure 2: all-reducing the same 60M parameters takes far less time in fewer,
    larger calls), so large messages win; the cap is finite so that reduction can start before
    backward ends.
  * reverse order: backward produces gradients from the last layer to the first, i.e. roughly in
    the reverse of `model.parameters()`, so buckets are filled in that order and the first bucket
    is complete early (torch also makes the first bucket small, 1 MiB, to start even sooner).
  * overlap: a post-accumulate-grad hook per parameter counts the bucket's ready gradients; when a
    bucket is full its all-reduce is launched with async_op=True while autograd keeps computing the
    earlier layers' gradients. Collectives are matched by order across ranks, so buckets are
    launched strictly in index order on every rank (bucket i waits for bucket i-1).
  * gradients are views into the buckets (torch's gradient_as_bucket_view): autograd accumulates
    straight into the buffer, so there is no copy in and no copy out.
At the end of backward (an autograd-engine callback, the same place torch DDP uses) buckets not
yet launched go out in order and every handle is waited on, so `loss.backward()` returns with
averaged gradients, ready for clipping; a second backward can never add into a buffer that is
still being reduced. Each bucket is divided by N before its sum-all-reduce.

Unused parameters: a parameter that got no gradient on a rank in a backward contributes zeros
(its slot is zero, or holds what no_sync micro-batches accumulated), so its gradient is the sum
over the ranks that used it, divided by N; all ranks stay in lockstep and nothing hangs. Its
`.grad` is then a (possibly zero) tensor, not None, so AdamW still decays it and moves it by its
momentum, unlike one process where a None grad skips it: freeze (requires_grad=False) what should
not train. Tied weights (GPT's lm_head = wte) appear once in `model.parameters()`; autograd sums
both uses before the single accumulate, so they need nothing special.

Mixed precision (ltk/parallel/mixed.py): an optimizer factory made by `mixed_factory` casts the
parameters to bf16 when the engine builds its optimizer (before the buckets are allocated), so
buckets, gradients and the all-reduce are bf16 (Ψ·2 bytes, cost.zero_comm_bytes) and AdamW
updates fp32 masters. `reduce_dtype` fp32 reduces an fp32 copy of each bucket instead (Ψ·4
bytes): the sum over ranks rounds once, and the masters take the fp32 mean as it is.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch.autograd import Variable

from ltk.parallel.dist import Comm
from ltk.parallel.mixed import MasterOptimizer, as_dtype, clip_


def _normalize_groups(param_groups: Iterable, params: list[torch.Tensor]) -> list[dict]:
    """A plain list of parameters is one group; every tensor must be a trainable parameter of
    the model, in one group only. The groups' other keys are kept."""
    groups = list(param_groups)
    if not groups:
        raise ValueError("param_groups is empty")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    known, seen, out = {id(p) for p in params}, set(), []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(f"param_groups[{i}] must be a dict with a 'params' list, got {type(g).__name__}")
        ps = list(g["params"])
        for p in ps:
            if not isinstance(p, torch.Tensor) or id(p) not in known:
                raise ValueError(f"param_groups[{i}] holds {type(p).__name__} {tuple(getattr(p, 'shape', ()))} "
                                 "that is not a trainable parameter of the model")
            if id(p) in seen:
                raise ValueError(f"param_groups[{i}] repeats a parameter of shape {tuple(p.shape)} already in a group")
            seen.add(id(p))
        out.append({**g, "params": ps})
    return out


class _DataParallel:
    """What both engines share: the broadcast at start, the optimizer, clipping, state dicts."""

    def __init__(self, model: torch.nn.Module, param_groups, optimizer_factory: Callable, comm: Comm,
                 reduce_dtype=None):
        self.module, self.comm = model, comm
        self.params = [p for p in model.parameters() if p.requires_grad]  # unique: a tied weight once
        if not self.params:
            raise ValueError("the model has no parameter that requires grad")
        self.names = {id(p): n for n, p in model.named_parameters()}
        groups = _normalize_groups(param_groups, self.params)
        with torch.no_grad():  # replicas must start equal, whatever each rank's initialization did
            for t in itertools.chain(model.parameters(), model.buffers()):
                comm.broadcast(t.detach(), src=0)
        self.optimizer = optimizer_factory(groups)  # a mixed-precision factory casts the parameters here
        self.mixed = isinstance(self.optimizer, MasterOptimizer)
        self.reduce_dtype = as_dtype(reduce_dtype) if reduce_dtype is not None else self.params[0].dtype
        self._reduced: dict[int, torch.Tensor] = {}  # id(param) -> its fp32 mean (reduce_dtype apart)
        self._no_sync = False

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally, without communication."""
        prev, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = prev

    def _grads_ready(self) -> None:
        """Make every rank's gradients the averaged ones (or refuse)."""
        raise NotImplementedError

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of the averaged gradients (every rank holds them all, so the local norm is
        the global one); scales them by max_norm / norm when that is < 1 and max_norm is finite."""
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive (math.inf only measures), got {max_norm}")
        self._grads_ready()
        if self.mixed:  # on the fp32 master gradients
            self.prepare_master_grads()
            return clip_(self.optimizer.masters(), max_norm)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm)
        return norm.item()

    def prepare_master_grads(self) -> None:
        """Mixed precision: the masters' fp32 gradients, from an fp32 reduction where there was one."""
        self.optimizer.prepare_grads(self._reduced or None)

    def step(self) -> None:
        self._grads_ready()
        if self.mixed:
            self.prepare_master_grads()
        self.optimizer.step()
        self._reduced = {}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter by name (a tied weight under its first name), the same on every rank;
        the fp32 masters under mixed precision."""
        if self.mixed:
            return self.optimizer.master_state({id(p): n for n, p in self.module.named_parameters()})
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()  # replicated: the same on every rank

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class NaiveDDP(_DataParallel):
    """After backward, one blocking all-reduce per parameter tensor (P calls of Ψ bytes in all).

    The reduction runs once per step, in `sync_grads()` (called by clip_grad_norm_ or step,
    whichever comes first), so `no_sync()` changes nothing here: accumulated micro-batch
    gradients are reduced together anyway. A parameter without a gradient reduces zeros."""

    def __init__(self, model, param_groups, optimizer_factory, comm, reduce_dtype=None):
        super().__init__(model, param_groups, optimizer_factory, comm, reduce_dtype)
        self._synced = False

    def sync_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad if self.reduce_dtype == p.grad.dtype else p.grad.to(self.reduce_dtype)
            g.div_(self.comm.size)  # Σ_r (g_r / N) = mean
            self.comm.all_reduce(g)
            if g is not p.grad:
                self._reduced[id(p)] = g
                p.grad.copy_(g)
        self._synced = True

    def _grads_ready(self) -> None:
        if not self._synced:
            self.sync_grads()

    def step(self) -> None:
        super().step()
        self._synced = False

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self._synced, self._reduced = False, {}
        if self.mixed:
            self.optimizer.zero_grad()


def assign_buckets(params: list[torch.Tensor], cap_bytes: int, first_cap_bytes: int | None = None
                   ) -> list[list[torch.Tensor]]:
    """Greedy in the given order: a bucket closes once it holds >= its cap (so it passes the cap by
    at most one tensor, torch's rule; a tensor larger than the cap is a bucket alone) or when the
    dtype/device changes. The first bucket's cap is `first_cap_bytes` (default: the cap)."""
    buckets, cur, size = [], [], 0
    for p in params:
        if cur and (p.dtype, p.device) != (cur[0].dtype, cur[0].device):
            buckets.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.numel() * p.element_size()
        if size >= (first_cap_bytes if not buckets and first_cap_bytes else cap_bytes):
            buckets.append(cur)
            cur, size = [], 0
    return buckets + ([cur] if cur else [])


class DDP(_DataParallel):
    """Bucketed gradient all-reduce overlapped with backward (module docstring; Li et al. §3.2.3).

    bucket_cap_mb:  bucket size in MiB (torch's default 25)
    first_bucket_mb: the first bucket's size, capped by bucket_cap_mb (torch's 1 MiB): the last
                     layers' gradients start travelling while most of backward is still to run
    """

    def __init__(self, model, param_groups, optimizer_factory, comm, bucket_cap_mb: float = 25.0,
                 first_bucket_mb: float = 1.0, reduce_dtype=None):
        if not (bucket_cap_mb > 0 and first_bucket_mb > 0):
            raise ValueError(f"bucket_cap_mb and first_bucket_mb must be positive, got {bucket_cap_mb} and "
                             f"{first_bucket_mb}")
        super().__init__(model, param_groups, optimizer_factory, comm, reduce_dtype)
        cap = int(bucket_cap_mb * 2**20)
        self.buckets = assign_buckets(self.params[::-1], cap, min(cap, int(first_bucket_mb * 2**20)))
        self.buffers: list[torch.Tensor] = []
        self._view: dict[int, torch.Tensor] = {}  # id(param) -> its slot in a bucket, shaped like it
        self._bucket_of: dict[int, int] = {}
        for i, ps in enumerate(self.buckets):
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            offset = 0
            for p in ps:
                self._view[id(p)] = flat[offset:offset + p.numel()].view_as(p)  # (numel,) -> p.shape
                self._bucket_of[id(p)] = i
                offset += p.numel()
            self.buffers.append(flat)
        self._accumulated = False  # a no_sync backward left local, unaveraged gradients
        self._reset_round()
        self.zero_grad()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def remove_hooks(self) -> None:
        """Detach the engine from the model (before wrapping it in another engine)."""
        for h in self._hooks:
            h.remove()

    def _reset_round(self) -> None:
        self._ready = [0] * len(self.buckets)  # gradients ready per bucket in this backward
        self._marked: set[int] = set()
        self._next = 0  # the next bucket to launch: strictly in index order, the same on every rank
        self._handles: list = []
        self._wide: list = []  # (bucket index, its fp32 copy in flight) under reduce_dtype fp32
        self._in_backward = False

    def _adopt(self, p: torch.Tensor) -> None:
        """Make p.grad its bucket view again (after a zero_grad(set_to_none) elsewhere, say)."""
        view = self._view[id(p)]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        else:
            return
        p.grad = view

    def _on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate hook: p.grad (in its bucket) is final for this backward."""
        self._adopt(p)
        if self._no_sync:
            self._accumulated = True
            return
        if id(p) in self._marked:
            raise RuntimeError(f"parameter {self.names[id(p)]!r} got its gradient twice in one backward "
                               "(reentrant activation checkpointing? use use_reentrant=False)")
        if not self._in_backward:
            self._in_backward = True
            Variable._execution_engine.queue_callback(self._finish_backward)
        self._marked.add(id(p))
        self._ready[self._bucket_of[id(p)]] += 1
        self._launch(force=False)

    def _launch(self, force: bool) -> None:
        """Launch the next buckets in order while they are full (or all of them, with force)."""
        while self._next < len(self.buckets):
            ps = self.buckets[self._next]
            if not force and self._ready[self._next] < len(ps):
                return
            for p in ps:
                if id(p) not in self._marked:  # unused in this backward: zeros or the no_sync sum
                    self._adopt(p)
            flat = self.buffers[self._next]
            if flat.dtype != self.reduce_dtype:  # reduce an upcast copy; the masters read it (module docstring)
                flat = flat.to(self.reduce_dtype)
                self._wide.append((self._next, flat))
            flat.div_(self.comm.size)  # Σ_r (g_r / N) = mean
            self._handles.append(self.comm.all_reduce(flat, async_op=True))
            self._next += 1

    def _finish_backward(self) -> None:
        self._launch(force=True)
        self._wait_and_reset()
        self._accumulated = False

    def _wait_and_reset(self) -> None:
        for h in self._handles:
            if h is not None:  # None: a group of one
                h.wait()
        for i, wide in self._wide:
            self.buffers[i].copy_(wide)  # .grad holds the mean too, rounded
            offset = 0
            for p in self.buckets[i]:
                self._reduced[id(p)] = wide[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        self._reset_round()

    def _grads_ready(self) -> None:
        if self._accumulated:
            raise RuntimeError("the last backward ran inside no_sync(), so its gradients were never averaged "
                               "over ranks: run the last micro-batch's backward outside no_sync()")

    def zero_grad(self) -> None:
        """Zero the buckets in place; gradients stay views into them."""
        self._wait_and_reset()  # only non-empty after a backward that raised
        for flat in self.buffers:
            flat.zero_()
        if self.mixed:
            self.optimizer.zero_grad()  # the masters' gradients (and .grad, restored just below)
        for p in self.params:
            p.grad = self._view[id(p)]
        self._accumulated, self._reduced = False, {}
