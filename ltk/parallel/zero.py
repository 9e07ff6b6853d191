"""ZeRO stages 1 and 2 (Rajbhandari et al. 2020, "ZeRO", §5.1 P_os and §5.2 P_os+g), written on
the counted collectives of ltk/parallel/dist.py, and the flat-shard machinery ZeRO-3 (zero3.py)
shares.

Partition. The parameters of one buffer (a param group here, a unit in ZeRO-3) are laid end to
end in a flat vector of Ψ_b elements, zero-padded to N·s, s = ceil(Ψ_b/N) (cost.shard_numel);
rank r owns the contiguous shard [r·s, (r+1)·s):

    flat = [ p_1 | p_2 | ... | p_k | 0 pad ]        (N·s,)
           [ rank 0 |  rank 1  | ... | rank N-1 ]   s elements each

A rank keeps the fp32 master copy of its shard and the optimizer state for it only. The
optimizer is built by the caller's factory on the shard tensors, one group per original group
with its other keys (weight_decay, lr, ...), so `engine.optimizer.param_groups[i]` is group i.

    stage 1  grads accumulate in full (Ψ·g, .grad are views of one flat buffer); at step():
             reduce-scatter the flat grad to the owners (payload Ψ·g), average (/N), update the
             shard, all-gather the updated parameters (Ψ·p) into the flat parameter buffer.
    stage 2  every micro-batch, a param group's flat gradient is reduce-scattered as soon as
             its last gradient of this backward is accumulated (async: it overlaps the rest of
             the backward; waited for at its end), added to the persistent gradient shard, and
             the full .grad freed: between backwards a rank holds s·g bytes of gradient.
             Payload per step: m·Ψ·g reduce-scatter + Ψ·p all-gather (cost.zero_comm_bytes).

Padding: collectives move (and unsharded buffers hold) the padded N·s_b elements, so the counted
bytes equal cost.zero_comm_bytes(Ψ̃), Ψ̃ = Σ_b N·s_b, and `state_bytes()` equals
Σ_b cost.model_state_bytes(N·s_b, N, stage); both are the formulas at Ψ when every N | Ψ_b.

Mixed precision (`compute_dtype` bf16/fp16): the parameters the model reads, the gradients and
both collectives are in the compute dtype (Precision.of: p = g = 2); the optimizer updates the
fp32 master shard (K = 12 with Adam). No loss scaling here: fp16 without a scaler can underflow.
In fp32 the master shard is a view of the flat parameters themselves (K = 8: no extra copy).
`reduce_dtype` fp32 (FSDP2's reduce_dtype): gradients are flattened to fp32 before the
reduce-scatter (Ψ·4 bytes, cost.Precision.of(dtype, reduce)), and the reduced shard stays fp32.

`no_sync()` is a no-op for both stages: stage 1 only communicates at step(), and stage 2 keeps no
full gradient to accumulate into, so it reduce-scatters every micro-batch, as the cost model says.
"""
from __future__ import annotations

import contextlib
import math

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


class ZeroEngine(ShardedEngine):
    """ZeRO-1 (stage=1) or ZeRO-2 (stage=2): one flat buffer per param group."""

    def __init__(self, model: nn.Module, param_groups, optimizer_factory, comm: Comm, *, stage: int = 1,
                 compute_dtype="fp32", reduce_dtype=None):
        if stage not in (1, 2):
            raise ValueError(f"ZeroEngine runs ZeRO stage 1 or 2, got {stage} (stage 3: parallel.zero3.Zero3Engine)")
        super().__init__(model, comm, compute_dtype, reduce_dtype)
        self.stage = stage
        self._group_params, keys = normalize_groups(model, param_groups)
        self._owner: dict[int, FlatShard] = {}
        self._pending: list = []  # (handle, buffer, flat grad kept alive, shard out) in flight
        self._callback_queued = False
        for params in filter(None, self._group_params):  # an empty group keeps its (empty) optimizer group
            layout = FlatLayout([self.names[id(p)] for p in params], params, comm.size, comm.rank)
            full = self._broadcast_flat(layout)  # (N·s,) fp32
            flat = full if self.dtype == torch.float32 else full.to(self.dtype)
            master = full[layout.lo:layout.hi]
            if self.dtype != torch.float32:
                master = master.clone()  # fp32 master; the fp32 case shares the parameters' storage
            buf = FlatShard(layout, master, [(master, 0, layout.shard)])
            buf.flat = flat
            for p, v in zip(params, layout.views(flat)):
                p.data = v  # the model now reads the flat buffer (p keeps its own version counter)
                self._owner[id(p)] = buf
                if stage == 2:
                    p.register_post_accumulate_grad_hook(self._on_grad)
            size = layout.padded if stage == 1 else layout.shard  # full (N·s,) or shard (s,) gradient
            # stage 1's full gradient is what .grad views (the parameters' dtype); stage 2's shard is reduced
            buf.grad = torch.zeros(size, dtype=self.dtype if stage == 1 else self.reduce_dtype, device=layout.device)
            buf.ready, buf.launched = 0, False
            self.buffers.append(buf)
        masters = iter(b.master for b in self.buffers)
        self.optimizer = optimizer_factory([{**k, "params": [next(masters)] if ps else []}
                                            for k, ps in zip(keys, self._group_params)])
        self.zero_grad()

    # -- stage 2: reduce-scatter during backward -----------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._callback_queued:  # once per backward: finish what the hooks started
            Variable._execution_engine.queue_callback(self._end_backward)
            self._callback_queued = True
        buf = self._owner[id(p)]
        buf.ready += 1
        if buf.ready == len(buf.layout.params):
            self._launch(buf)

    def _launch(self, buf: FlatShard) -> None:
        flat = buf.layout.flatten([p.grad for p in buf.layout.params], self.reduce_dtype)  # (N·s,)
        for p in buf.layout.params:
            p.grad = None  # a rank keeps gradients only as its shard
        out = torch.empty_like(buf.grad)
        self._pending.append((self.comm.reduce_scatter(out, flat, async_op=True), buf, flat, out))
        buf.launched = True

    def _end_backward(self) -> None:
        for buf in self.buffers:  # every buffer every backward, so all ranks issue the same calls
            if not buf.launched:
                self._launch(buf)
        for handle, buf, _, out in self._pending:
            if handle is not None:
                handle.wait()
            buf.grad += out
            buf.ready, buf.launched = 0, False
        self._pending, self._callback_queued = [], False

    # -- step -----------------------------------------------------------------------------------
    def _reduced_grad_shards(self) -> list[torch.Tensor]:
        if self.stage == 2:
            return [b.grad for b in self.buffers]
        outs, handles = [], []
        for buf in self.buffers:
            for p, v in zip(buf.layout.params, buf.layout.views(buf.grad)):
                if p.grad is not None and p.grad.data_ptr() != v.data_ptr():
                    v.copy_(p.grad)  # .grad was replaced (set to None, then a fresh backward)
                p.grad = v
            outs.append(torch.empty(buf.layout.shard, dtype=self.reduce_dtype, device=buf.grad.device))
            handles.append(self.comm.reduce_scatter(outs[-1], buf.grad.to(self.reduce_dtype), async_op=True))
        for h in handles:
            if h is not None:
                h.wait()
        return outs

    def step(self) -> None:
        """Optimizer step on the shards, then all-gather the updated parameters (Ψ·p)."""
        self._prepare_grads()
        self.optimizer.step()
        handles = [self.comm.all_gather(b.flat, b.master.to(self.dtype, copy=True), async_op=True)
                   for b in self.buffers]
        for h in handles:
            if h is not None:
                h.wait()

    def zero_grad(self) -> None:
        self._zero_master_grads()
        for buf in self.buffers:
            buf.grad.zero_()
            views = buf.layout.views(buf.grad) if self.stage == 1 else [None] * len(buf.layout.params)
            for p, v in zip(buf.layout.params, views):
                p.grad = v  # stage 1: autograd accumulates into these views in place

    def _param_tensors(self):
        return [b.flat for b in self.buffers]

    def _grad_tensors(self):
        return [b.grad for b in self.buffers]
