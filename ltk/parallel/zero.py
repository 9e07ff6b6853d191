"""ZeRO stages 1 and 2 (Rajbhandari et al. 2020, "ZeRO", §5.1 P_os and §5.2 P_os+g), written on
the counted collectives of ltk/parallel/dist.py, and the flat-shard machinery ZeRO-3 (zero3.py)
shares.

Partition. The parameters of one buffer (a gradient bucket here, a unit in ZeRO-3) are laid end
to end in a flat vector of Ψ_b elements, zero-padded to N·s, s = ceil(Ψ_b/N) (cost.shard_numel);
rank r owns the contiguous shard [r·s, (r+1)·s):

    flat = [ p_1 | p_2 | ... | p_k | 0 pad ]        (N·s,)
           [ rank 0 |  rank 1  | ... | rank N-1 ]   s elements each

A rank keeps the fp32 master copy of its shard and the optimizer state for it only. Within a
buffer the parameters are ordered by param group, so the shard meets each group in one piece
(`group_pieces`); the optimizer is built by the caller's factory on those pieces, one group per
original group with its other keys (weight_decay, lr, ...), so `engine.optimizer.param_groups[i]`
is group i (a rank whose shards miss a group gets an empty group).

Buckets (DeepSpeed's overlap_comm / reduce_bucket_size; torch DDP's buckets, ltk/parallel/ddp.py):
the parameters are cut, in reverse registration order (the order backward produces their
gradients), into buckets of about `bucket_mb` MiB, one flat buffer each. A post-accumulate-grad
hook counts each bucket's ready gradients; a complete bucket is reduce-scattered asynchronously
while autograd computes the earlier layers' gradients, strictly in bucket order on every rank
(collectives match by order). An end-of-backward callback launches what is left (a parameter
with no gradient sends zeros) and waits for everything, so backward returns with reduced shards.

    stage 1  gradients accumulate in full (Ψ·g; .grad are views of the buckets). Backwards inside
             no_sync() only accumulate; the backward outside it (the last micro-batch's, as DDP)
             reduce-scatters each bucket as it completes into this rank's shard, then zeroes the
             bucket (a further backward adds only what is new). A step whose last backward ran
             inside no_sync reduces at the step instead.
    stage 2  every backward, a complete bucket is flattened (N·s_b,), its full .grad freed and
             the flat reduce-scattered into the persistent shard (s·g bytes between backwards);
             at most `max_in_flight` buckets are in flight (the oldest is waited for before
             another launches), so the peak gradient memory is about Ψ/N·g + the buckets whose
             gradients are being produced or in flight, not 2Ψ.
    step     average (/N), the optimizer updates the shards, then all-gather the parameters
             (Ψ·p), one async call per bucket in forward order. The next forward waits for a
             bucket in the pre-hook of the first module owning one of its parameters, so the
             first layers compute while the later layers' parameters arrive; the model's
             forward hook waits for the rest, and every path that reads parameters or master
             shards otherwise (state dicts, `wait_params()`) waits first.

Payload per step: reduce-scatter Ψ·g once (stage 1, with no_sync) or m times (stage 2) and one
all-gather of Ψ·p (cost.zero_comm_bytes). Padding is per bucket: collectives move (and unsharded
buffers hold) the padded N·s_b elements, so the counted bytes equal cost.zero_comm_bytes(Ψ̃),
Ψ̃ = Σ_b N·s_b (`padded_numels()`), and `state_bytes()` at rest equals
Σ_b cost.model_state_bytes(N·s_b, N, stage); both are the formulas at Ψ when every N | Ψ_b.

Mixed precision (`compute_dtype` bf16/fp16): the parameters the model reads, the gradients and
both collectives are in the compute dtype (Precision.of: p = g = 2); the optimizer updates the
fp32 master shard (K = 12 with Adam). No loss scaling here: fp16 without a scaler can underflow.
In fp32 the master shard is a view of the flat parameters themselves (K = 8: no extra copy).
`reduce_dtype` fp32 (FSDP2's reduce_dtype): gradients are flattened to fp32 before the
reduce-scatter (Ψ·4 bytes, cost.Precision.of(dtype, reduce)), and the reduced shard stays fp32.
"""
from __future__ import annotations

import contextlib
import math
from collections import deque
from functools import partial

import torch
import torch.nn as nn
from torch.autograd import Variable

from ltk.parallel.cost import shard_numel
from ltk.parallel.dist import Comm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(compute_dtype) -> torch.dtype:
    if isinstance(compute_dtype, torch.dtype) and compute_dtype in DTYPES.values():
        return compute_dtype
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {compute_dtype!r}")
    return DTYPES[compute_dtype]


def normalize_groups(model: nn.Module, param_groups) -> tuple[list[list[nn.Parameter]], list[dict]]:
    """(params of each group, other keys of each group); a plain list of parameters is one group.
    Every trainable parameter of the model must be in exactly one group."""
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    owned = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    params, keys = [], []
    for i, g in enumerate(groups):
        ps = list(g["params"])
        for p in ps:
            if id(p) not in owned:
                raise ValueError(f"param group {i} holds a tensor of shape {tuple(p.shape)} "
                                 "that is not a parameter of the model")
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears in two param groups")
            seen.add(id(p))
        params.append(ps)
        keys.append({k: v for k, v in g.items() if k != "params"})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no param group: {missing}")
    return params, keys


class FlatLayout:
    """Where each parameter of a buffer lives in the flat vector, and this rank's shard."""

    def __init__(self, names: list[str], params: list[nn.Parameter], world: int, rank: int):
        self.names, self.params, self.device = names, params, params[0].device
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.numel = sum(self.numels)  # Ψ_b
        self.shard = shard_numel(self.numel, world)  # s
        self.padded = self.shard * world  # N·s
        self.lo, self.hi = rank * self.shard, (rank + 1) * self.shard

    def flatten(self, tensors, dtype: torch.dtype) -> torch.Tensor:
        """(N·s,) vector of the tensors end to end; None and the padding are zeros."""
        flat = torch.empty(self.padded, dtype=dtype, device=self.device)
        flat[self.numel:].zero_()
        for t, o, n in zip(tensors, self.offsets, self.numels):
            flat[o:o + n].zero_() if t is None else flat[o:o + n].copy_(t.reshape(-1))
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + n].view(p.shape) for p, o, n in zip(self.params, self.offsets, self.numels)]


class FlatShard:
    """One buffer on one rank: its layout, the fp32 master shard, and the optimizer's tensors,
    `pieces` = [(master[a:b], a, b)] (one piece per param group the shard meets; stage 1/2: the
    whole shard). Engines hang their own buffers on it (flat params, grads, gathered units)."""

    def __init__(self, layout: FlatLayout, master: torch.Tensor, pieces: list[tuple[torch.Tensor, int, int]]):
        self.layout, self.master, self.pieces = layout, master, pieces
        self.grad32: torch.Tensor | None = None  # the averaged fp32 gradient shard, between reduce and zero_grad


class ShardedEngine:
    """What ZeRO-1/2/3 share: forward, norm clipping, consolidated state dicts, memory audit.
    Subclasses set self.buffers and implement _reduced_grad_shards, _param_tensors, _grad_tensors."""

    def __init__(self, model: nn.Module, comm: Comm, compute_dtype, reduce_dtype=None):
        self.module, self.comm, self.dtype = model, comm, resolve_dtype(compute_dtype)
        self.reduce_dtype = self.dtype if reduce_dtype is None else resolve_dtype(reduce_dtype)
        self.names = {id(p): n for n, p in model.named_parameters()}  # a tied weight: its first name
        self.buffers: list[FlatShard] = []
        self._grads_prepared = False

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()  # see the module docstring: every stage keeps its schedule

    def padded_numels(self) -> list[int]:
        """N·ceil(Ψ_b/N) of every flat buffer: the Ψ at which the cost model gives this engine's
        bytes exactly (cost.zero_comm_bytes(Σ), Σ_b cost.model_state_bytes(Ψ̃_b))."""
        return [b.layout.padded for b in self.buffers]

    def _broadcast_flat(self, layout: FlatLayout) -> torch.Tensor:
        """The buffer's parameters in fp32, as rank 0 holds them (every rank starts alike)."""
        full = layout.flatten([p.detach() for p in layout.params], torch.float32)
        self.comm.broadcast(full, src=0)
        return full

    # -- gradients ------------------------------------------------------------------------
    def _prepare_grads(self) -> None:
        """Sum of gradients over ranks -> averaged fp32 gradient shard -> the optimizer's .grad."""
        if self._grads_prepared:
            return
        for buf, g in zip(self.buffers, self._reduced_grad_shards()):
            buf.grad32 = (g if g.dtype == torch.float32 else g.float()).div_(self.comm.size)
            for t, a, b in buf.pieces:
                t.grad = buf.grad32[a:b]
        self._grads_prepared = True

    def clip_grad_norm_(self, max_norm: float) -> float:
        """‖g‖ = sqrt(Σ_ranks Σ_shard g²): each rank squares its own shard (padding is zero), one
        all-reduce of a 4-byte scalar sums them. Grads are scaled by min(1, max_norm/(‖g‖+1e-6)),
        as torch.nn.utils.clip_grad_norm_ does; max_norm = math.inf only measures."""
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive (math.inf only measures), got {max_norm}")
        self._prepare_grads()
        sq = torch.zeros((), dtype=torch.float32, device=self.buffers[0].master.device)
        for buf in self.buffers:
            sq += buf.grad32.pow(2).sum()
        self.comm.all_reduce(sq)
        norm = sq.sqrt().item()
        if math.isfinite(max_norm):
            coef = min(1.0, max_norm / (norm + 1e-6))
            for buf in self.buffers:
                buf.grad32.mul_(coef)
        return norm

    def _zero_master_grads(self) -> None:
        for buf in self.buffers:
            buf.grad32 = None
            for t, _, _ in buf.pieces:
                t.grad = None
        self._grads_prepared = False

    # -- consolidated checkpoints -----------------------------------------------------------
    def _gather_flat(self, buf: FlatShard, local: torch.Tensor) -> list[torch.Tensor]:
        full = torch.empty(buf.layout.padded, dtype=local.dtype, device=local.device)
        self.comm.all_gather(full, local)
        return [v.clone() for v in buf.layout.views(full)]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """model.state_dict() of the single-process model: fp32 parameters gathered from the
        master shards under every name (tied weights under both), buffers as they are."""
        values = {}
        for buf in self.buffers:
            for p, v in zip(buf.layout.params, self._gather_flat(buf, buf.master)):
                values[id(p)] = v
        return {k: values[id(t)] if id(t) in values else t.detach().clone()
                for k, t in self.module.state_dict(keep_vars=True).items()}

    def _group_names(self) -> list[list[str]]:
        return [[self.names[id(p)] for p in ps] for ps in self._group_params]

    def optimizer_state_dict(self) -> dict:
        """Single-process form: {"state": {name: {key: full-size tensor or scalar}}, "param_groups":
        [{hyper-parameters, "params": [names]}]}. State with the shape of a piece (Adam's m, v) is
        all-gathered and cut per parameter; 0-d state (step) is the same on every piece."""
        state: dict[str, dict] = {}
        for buf in self.buffers:
            first = self.optimizer.state.get(buf.pieces[0][0], {})
            for key, v0 in sorted(first.items()):
                if torch.is_tensor(v0) and v0.shape == buf.pieces[0][0].shape:
                    local = torch.zeros(buf.layout.shard, dtype=v0.dtype, device=v0.device)
                    for t, a, b in buf.pieces:
                        local[a:b] = self.optimizer.state[t][key]
                    vals = self._gather_flat(buf, local)
                else:
                    vals = [v0.clone() if torch.is_tensor(v0) else v0 for _ in buf.layout.params]  # one counter each
                for n, v in zip(buf.layout.names, vals):
                    state.setdefault(n, {})[key] = v
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.optimizer.param_groups, self._group_names())]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, sd: dict) -> None:
        """Reshard a consolidated state (from any world size, or a single process) onto this one."""
        ours = self._group_names()
        if len(sd["param_groups"]) != len(ours):
            raise ValueError(f"optimizer state has {len(sd['param_groups'])} param groups, the engine has {len(ours)}")
        for i, (g, names) in enumerate(zip(sd["param_groups"], ours)):
            if set(g["params"]) != set(names):
                raise ValueError(f"param group {i} names differ: {sorted(set(g['params']) ^ set(names))}")
            self.optimizer.param_groups[i].update({k: v for k, v in g.items() if k != "params"})
        for buf in self.buffers:
            names = buf.layout.names
            have = [n in sd["state"] for n in names]
            if not any(have):
                continue
            if not all(have):
                raise ValueError(f"optimizer state lacks {[n for n, h in zip(names, have) if not h]}")
            for t, _, _ in buf.pieces:
                self.optimizer.state[t] = {}
            for key, v0 in sd["state"][names[0]].items():
                if torch.is_tensor(v0) and v0.shape == buf.layout.params[0].shape:
                    flat = buf.layout.flatten([sd["state"][n][key] for n in names], v0.dtype)
                    for t, a, b in buf.pieces:
                        self.optimizer.state[t][key] = flat[buf.layout.lo + a:buf.layout.lo + b].clone()
                else:
                    for t, _, _ in buf.pieces:
                        self.optimizer.state[t][key] = v0.clone().to(t.device) if torch.is_tensor(v0) else v0

    # -- memory audit -------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this rank holds for parameters, gradients and optimizer state
        (elementwise state: Adam's m, v and the fp32 master; not the 0-d step counters), each
        storage counted once, first under params, then grads (an fp32 master that is the
        parameter storage itself counts as params). A freed (resized to 0) buffer counts 0."""
        seen: dict[int, int] = {}

        def total(tensors) -> int:
            new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                   if t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in seen}
            seen.update(new)
            return sum(new.values())

        opt = [b.master for b in self.buffers] + [v for st in self.optimizer.state.values() for v in st.values()
                                                  if torch.is_tensor(v) and v.dim() > 0]
        return {"params": total(self._param_tensors()), "grads": total(self._grad_tensors()), "optimizer": total(opt)}


def zero_buckets(params: list[nn.Parameter], cap_numel: int) -> list[list[nn.Parameter]]:
    """Greedy in the given order (reverse registration: the order backward produces gradients,
    as ltk/parallel/ddp.py buckets): a bucket closes once it holds >= cap_numel elements, so a
    tensor larger than the cap is a bucket alone."""
    buckets, cur, size = [], [], 0
    for p in params:
        cur.append(p)
        size += p.numel()
        if size >= cap_numel:
            buckets.append(cur)
            cur, size = [], 0
    return buckets + ([cur] if cur else [])


def group_pieces(layout: FlatLayout, groups: list[int], master: torch.Tensor) -> tuple[list, list[int]]:
    """This rank's pieces of a buffer whose parameters are ordered by param group (groups[i]:
    the group of layout.params[i]): group g covers [start, end) of the flat vector, the last
    group also the padding; the piece is its intersection with the shard. Returns
    ([(master[a:b], a, b)], [group of each piece]); a group the shard misses has no piece."""
    pieces, owners, order = [], [], sorted(set(groups))
    for i, g in enumerate(order):
        start = layout.offsets[groups.index(g)]
        end = layout.padded if i == len(order) - 1 else layout.offsets[groups.index(g) + groups.count(g)]
        a, b = max(start, layout.lo) - layout.lo, min(end, layout.hi) - layout.lo
        if a < b:
            pieces.append((master[a:b], a, b))
            owners.append(g)
    return pieces, owners


class ZeroEngine(ShardedEngine):
    """ZeRO-1 (stage=1) or ZeRO-2 (stage=2): one flat buffer per gradient bucket of about
    `bucket_mb` MiB (in the compute dtype), reduce-scattered from autograd hooks while backward
    runs (module docstring). ZeRO-2 keeps at most `max_in_flight` buckets' flat gradients alive."""

    def __init__(self, model: nn.Module, param_groups, optimizer_factory, comm: Comm, *, stage: int = 1,
                 compute_dtype="fp32", reduce_dtype=None, bucket_mb: float = 25.0,
                 max_in_flight: int = 2):
        if stage not in (1, 2):
            raise ValueError(f"ZeroEngine runs ZeRO stage 1 or 2, got {stage} (stage 3: parallel.zero3.Zero3Engine)")
        if not bucket_mb > 0 or max_in_flight < 1:
            raise ValueError(f"bucket_mb must be positive and max_in_flight >= 1, got {bucket_mb} and {max_in_flight}")
        super().__init__(model, comm, compute_dtype, reduce_dtype)
        self.stage, self.max_in_flight = stage, max_in_flight
        self._group_params, keys = normalize_groups(model, param_groups)
        group_of = {id(p): g for g, ps in enumerate(self._group_params) for p in ps}
        order = [p for p in model.parameters() if id(p) in group_of][::-1]  # unique: a tied weight once
        cap = max(1, int(bucket_mb * 2**20) // torch.empty((), dtype=self.dtype).element_size())
        opt_groups = [{**k, "params": []} for k in keys]  # an empty group keeps its (empty) optimizer group
        self._owner: dict[int, FlatShard] = {}
        self._view: dict[int, torch.Tensor] = {}  # stage 1: id(param) -> its slot in the bucket's gradient
        for params in zero_buckets(order, cap):
            params = sorted(params, key=lambda p: group_of[id(p)])  # stable: each group contiguous
            layout = FlatLayout([self.names[id(p)] for p in params], params, comm.size, comm.rank)
            full = self._broadcast_flat(layout)  # (N·s,) fp32
            flat = full if self.dtype == torch.float32 else full.to(self.dtype)
            master = full[layout.lo:layout.hi]
            if self.dtype != torch.float32:
                master = master.clone()  # fp32 master; the fp32 case shares the parameters' storage
            pieces, owners = group_pieces(layout, [group_of[id(p)] for p in params], master)
            for (t, _, _), g in zip(pieces, owners):
                opt_groups[g]["params"].append(t)
            buf = FlatShard(layout, master, pieces)
            buf.flat, buf.gather, buf.reduced = flat, None, None
            for p, v in zip(params, layout.views(flat)):
                p.data = v  # the model now reads the flat buffer (p keeps its own version counter)
                self._owner[id(p)] = buf
            size = layout.padded if stage == 1 else layout.shard  # full (N·s,) or shard (s,) gradient
            # stage 1's full gradient is what .grad views (the parameters' dtype); stage 2's shard is reduced
            buf.grad = torch.zeros(size, dtype=self.dtype if stage == 1 else self.reduce_dtype, device=layout.device)
            if stage == 1:  # (N·s,) -> one view per parameter, shaped like it
                self._view.update({id(p): v for p, v in zip(params, layout.views(buf.grad))})
            self.buffers.append(buf)
        self._index = {id(b): i for i, b in enumerate(self.buffers)}
        self.optimizer = optimizer_factory(opt_groups)
        self._pending: deque = deque()  # (handle, buffer, flat grad kept alive, shard out), oldest first
        self._no_sync = self._accumulated = False
        self._reset_round()
        self.zero_grad()
        for p in order:
            p.register_post_accumulate_grad_hook(self._on_grad)
        for m in model.modules():  # wait for a bucket's parameters before the first module that reads them
            bufs = {id(self._owner[id(p)]): self._owner[id(p)] for p in m.parameters(recurse=False)
                    if id(p) in self._owner}
            if bufs:
                m.register_forward_pre_hook(partial(self._pre_forward, list(bufs.values())))
        model.register_forward_hook(lambda *_: self.wait_params())  # nothing in flight past the forward

    # -- gradients: bucketed reduce-scatter during backward ---------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """ZeRO-1: backward passes inside accumulate full local gradients without communication;
        the next backward outside reduce-scatters them. ZeRO-2 keeps no full gradient to
        accumulate into: it reduce-scatters every backward, so this changes nothing there."""
        prev, self._no_sync = self._no_sync, self.stage == 1
        try:
            yield
        finally:
            self._no_sync = prev

    def _reset_round(self) -> None:
        self._ready = [0] * len(self.buffers)  # gradients ready per bucket in this backward
        self._marked: set[int] = set()
        self._next = 0  # the next bucket to launch: strictly in index order, the same on every rank
        self._in_backward = False

    def _adopt(self, p: nn.Parameter) -> None:
        """Stage 1: make p.grad its view of the bucket again (after it was replaced or set to None)."""
        view = self._view[id(p)]
        if p.grad is not None and p.grad.data_ptr() == view.data_ptr():
            return
        view.zero_() if p.grad is None else view.copy_(p.grad)
        p.grad = view

    def _on_grad(self, p: nn.Parameter) -> None:
        """Post-accumulate hook: p.grad is final for this backward."""
        if self.stage == 1:
            self._adopt(p)
            if self._no_sync:
                self._accumulated = True
                return
        if id(p) in self._marked:
            raise RuntimeError(f"parameter {self.names[id(p)]!r} got its gradient twice in one backward "
                               "(reentrant activation checkpointing? use use_reentrant=False)")
        if not self._in_backward:  # once per backward: finish what the hooks started
            Variable._execution_engine.queue_callback(self._end_backward)
            self._in_backward = True
        self._marked.add(id(p))
        self._ready[self._index[id(self._owner[id(p)])]] += 1
        self._launch(force=False)

    def _launch(self, force: bool) -> None:
        """Reduce-scatter the next buckets in order while they are complete (all, with force)."""
        while self._next < len(self.buffers):
            buf = self.buffers[self._next]
            if not force and self._ready[self._next] < len(buf.layout.params):
                return
            if self.stage == 1:
                for p in buf.layout.params:
                    self._adopt(p)  # unused in this backward: zeros, or what no_sync accumulated
                flat = buf.grad.to(self.reduce_dtype)  # (N·s,): the full gradients, in place unless reduced in fp32
            else:
                flat = buf.layout.flatten([p.grad for p in buf.layout.params], self.reduce_dtype)  # (N·s,)
                for p in buf.layout.params:
                    p.grad = None  # a rank keeps gradients only as its shard
            out = torch.empty(buf.layout.shard, dtype=self.reduce_dtype, device=flat.device)
            self._pending.append((self.comm.reduce_scatter(out, flat, async_op=True), buf, flat, out))
            self._next += 1
            self._drain(self.max_in_flight if self.stage == 2 else None)

    def _drain(self, keep: int | None) -> None:
        """Finish reduce-scatters in flight, oldest first: every one already done, then more
        (blocking) until at most `keep` remain (keep=None: only the done ones)."""
        while self._pending:
            handle, buf, _, out = self._pending[0]
            if handle is not None and not handle.is_completed() and (keep is None or len(self._pending) <= keep):
                return
            if handle is not None:
                handle.wait()
            self._pending.popleft()
            if self.stage == 2:
                buf.grad += out  # the persistent shard sums the micro-batches
            else:
                buf.reduced = out if buf.reduced is None else buf.reduced.add_(out)
                buf.grad.zero_()  # reduced: a later backward must not send these gradients again

    def _end_backward(self) -> None:
        self._launch(force=True)  # every bucket every backward, so all ranks issue the same calls
        self._drain(0)
        self._reset_round()
        self._accumulated = False

    def _reduced_grad_shards(self) -> list[torch.Tensor]:
        if self.stage == 1 and (self._accumulated or any(b.reduced is None for b in self.buffers)):
            self._launch(force=True)  # the last backward ran inside no_sync (or none ran): reduce now
            self._drain(0)
            self._reset_round()
            self._accumulated = False
        return [b.grad if self.stage == 2 else b.reduced for b in self.buffers]

    # -- parameters: all-gather after the step, waited for by the next forward ----------------------
    def _wait_gather(self, buf: FlatShard) -> None:
        if buf.gather is not None:
            buf.gather[0].wait()
            buf.gather = None

    def _pre_forward(self, bufs: list[FlatShard], module, args) -> None:
        for buf in bufs:
            self._wait_gather(buf)

    def wait_params(self) -> None:
        """Finish the parameter all-gathers step() started. The forward waits for each bucket
        before the first module that reads it; anything else that reads parameters or master
        shards (state dicts, checkpoints, evaluation outside the model's forward) calls this."""
        for buf in self.buffers:
            self._wait_gather(buf)

    def step(self) -> None:
        """Optimizer step on the shards, then all-gather the updated parameters (Ψ·p), async: one
        call per bucket in forward order (the last bucket holds the first layers), each waited
        for in the next forward's pre-hook of the first module that reads it."""
        self.wait_params()  # a step with no forward since the last: its gathers still write the masters
        self._prepare_grads()
        self.optimizer.step()
        for buf in reversed(self.buffers):
            src = buf.master.to(self.dtype, copy=True)  # (s,): the all-gather reads it while we go on
            handle = self.comm.all_gather(buf.flat, src, async_op=True)
            buf.gather = None if handle is None else (handle, src)

    def zero_grad(self) -> None:
        self._drain(0)  # only non-empty after a backward that raised
        self._reset_round()
        self._zero_master_grads()
        self._accumulated = False
        for buf in self.buffers:
            buf.grad.zero_()
            buf.reduced = None
            for p in buf.layout.params:
                p.grad = self._view.get(id(p))  # stage 1: autograd accumulates into these views in place

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        self.wait_params()
        return super().full_state_dict()

    def optimizer_state_dict(self) -> dict:
        self.wait_params()
        return super().optimizer_state_dict()

    def load_optimizer_state_dict(self, sd: dict) -> None:
        self.wait_params()
        super().load_optimizer_state_dict(sd)

    def _param_tensors(self):
        return [b.flat for b in self.buffers]

    def _grad_tensors(self):
        return [b.grad for b in self.buffers] + [b.reduced for b in self.buffers if b.reduced is not None]
