"""ZeRO stage 3 (Rajbhandari et al. 2020, "ZeRO", §5.3 P_os+g+p, §7.2.2): parameters, gradients
and optimizer state all sharded; a unit's full parameters exist only while it computes.

Units. The model is cut into units, each with one flat buffer sharded as in ltk/parallel/zero.py
(flat = [p_1 | ... | p_k | pad], rank r owns [r·s, (r+1)·s), s = ceil(Ψ_u/N)). Default rule:
every child of every nn.ModuleList reached from the root without entering another unit (GPT's
transformer blocks), plus the root unit: all remaining parameters (GPT: wte, wpe, ln_f and the
head). Tied weights: a parameter belongs to a unit only when every name it has lies inside that
unit; one tied across units, or between a unit and the root's own modules, belongs to the root
unit, which stays gathered through the whole forward and the whole backward. GPT's head
(lm_head.weight IS wte.weight) is one parameter of the root unit: gathered, reduced and stored
once. Within a unit the parameters are ordered by param group, so this rank's shard meets each
group in one contiguous piece: the optimizer's group g holds those pieces (views of the fp32
master shard; a rank whose shards miss a group gets an empty group).

Frozen tensors (fine-tuning: LoRA's frozen base, QLoRA's NF4 storage) are sharded too, as bytes:
each unit's frozen tensors in one uint8 vector (ltk/parallel/frozen_shard.py), gathered and freed
with the unit, never reduced, with no optimizer state. A unit may hold frozen tensors only (GPT's
root under LoRA: embeddings, final norm). A unit with frozen tensors is freed when the backward
reaches the next unit (or at its end), not when its last gradient arrives: LoRA's A and B get
their gradients in nodes of their own that autograd may run before the frozen W's node, which
still needs W for the input gradient.

Schedule of one micro-batch (as PyTorch FSDP runs it, Zhao et al. 2023; "full" = storage allocated):

    forward   root: all-gather before the model's forward, free after it (so the root is
              gathered again for the backward, as the cost model counts); unit u: all-gather in
              a forward pre-hook (waiting for the prefetch), start the async all-gather of the
              next unit (the order recorded in the previous forward), free after u's forward
              (storage resized to 0; the parameters stay views of that storage).
    backward  a gradient hook on each output of u (and of the model, for the root) fires before
              u's backward: all-gather u and prefetch the unit before it; when the last gradient
              of u has been accumulated (post-accumulate-grad hooks), its gradients are
              flattened and reduce-scattered asynchronously, .grad and the full parameters freed.
              At most two reduce-scatters are in flight: launching a third waits for the oldest
              and frees its flat gradient (else a rank would hold every unit's full gradient by
              the end of backward). A callback at the end of the backward waits for the rest, adds
              them to the persistent gradient shards, and reduces any unit some gradient never reached
              (every unit every backward, so all ranks issue the same collectives). A unit that
              activation checkpointing recomputes inside its backward is gathered already; its
              forward hooks then neither record, prefetch nor free.

Payload per micro-batch: every unit gathered twice and reduced once, 2·Ψ̃·p + Ψ̃·g with
Ψ̃ = Σ_u N·ceil(Ψ_u/N) the padded count (= Ψ when every unit divides by N): exactly
cost.zero_comm_bytes(Ψ̃, stage=3, m). No all-gather at step: the next forward gathers.
Mixed precision as in zero.py: full and sharded parameters, gradients and collectives in the
compute dtype; fp32 master shard (in fp32 the master shard is the parameter shard itself); with
`reduce_dtype` fp32 the gradients are reduce-scattered, and their shards kept, in fp32.
`no_sync()` is a no-op: ZeRO-3 keeps no full gradients, so it reduce-scatters every micro-batch.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.autograd import Variable

from ltk.models.init import make_real, materialized
from ltk.parallel.dist import Comm
from ltk.parallel.frozen_shard import FrozenBytes, frozen_tensors
from ltk.parallel.zero import FlatLayout, FlatShard, ShardedEngine, normalize_groups


def default_units(model: nn.Module) -> list[nn.Module]:
    """Every child of every ModuleList reachable from the root without entering a unit."""
    units: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(child.children())
            else:
                walk(child)

    walk(model)
    return units


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class Unit(FlatShard):
    """A module's parameters as one sharded flat buffer; `full` is allocated only while gathered.
    `frozen`: its frozen tensors as sharded bytes (ltk/parallel/frozen_shard.py), or None; a unit
    of frozen tensors only has no layout (layout, master, full, shard None)."""

    def __init__(self, layout: FlatLayout | None, master, pieces, full, shard, dtype):
        super().__init__(layout, master, pieces)
        self.full, self.shard = full, shard  # (N·s,) gathered params, (s,) this rank's params
        self.grad_shard = None if layout is None else \
            torch.zeros(layout.shard, dtype=dtype, device=layout.device)  # Σ over micro-batches
        self.frozen: FrozenBytes | None = None
        self.handles: list = []  # all-gathers in flight (trainable flat, frozen bytes)
        self.gathered, self.ready, self.reduced, self.free_later = False, 0, False, False


class Zero3Engine(ShardedEngine):
    """ZeRO-3 data parallelism; the engine contract of ltk/parallel/zero.py plus `units`."""

    def __init__(self, model: nn.Module, param_groups, optimizer_factory, comm: Comm, *, units=None,
                 compute_dtype="fp32", prefetch: bool = True, reduce_dtype=None,
                 device: torch.device | str | None = None):
        super().__init__(model, comm, compute_dtype, reduce_dtype)
        self.prefetch = prefetch
        # reduce-scatters in flight during backward: each keeps a unit's full flat gradient alive, so
        # waiting for all at the end would hold a whole model's gradients (FSDP limits them the same way)
        self.max_in_flight = 2
        # where a model built on the meta device (ltk/models/init.py) gets its storage
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        self._group_params, keys = normalize_groups(model, param_groups)
        group_of = {id(p): g for g, ps in enumerate(self._group_params) for p in ps}
        mods = default_units(model) if units is None else list(units)
        mod_name = {id(m): n for n, m in model.named_modules() if m is not model}
        for m in mods:
            if id(m) not in mod_name:
                raise ValueError(f"unit {type(m).__name__} is not a submodule of the model (the root is always a unit)")
        prefixes = [mod_name[id(m)] + "." for m in mods]
        if len(set(prefixes)) < len(mods) or any(a != b and a.startswith(b) for a in prefixes for b in prefixes):
            raise ValueError("units must be distinct and not nested (a unit inside another unit)")
        owners: dict[int, set] = {}  # parameter -> the units (None: the root) whose names reach it
        for n, p in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), set()).add(next((i for i, pre in enumerate(prefixes) if n.startswith(pre)), None))
        owned = [[p for p in m.parameters() if id(p) in group_of and owners[id(p)] == {i}] for i, m in enumerate(mods)]
        taken = {id(p) for ps in owned for p in ps}
        root = [p for p in model.parameters() if id(p) in group_of and id(p) not in taken]
        opt_groups = [{**k, "params": []} for k in keys]
        # frozen tensors (no group: a fine-tuned base, NF4 storage) by unit, sharded as bytes; the owner
        # rule is the parameters' (a frozen tensor tied across units belongs to the root)
        frozen: dict = {}
        for e in frozen_tensors(model, set(group_of), self.dtype):
            names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is e.tensor] or [e.name]
            owner = {next((i for i, pre in enumerate(prefixes) if n.startswith(pre)), None) for n in names}
            frozen.setdefault(owner.pop() if len(owner) == 1 else None, []).append(e)
        self.units: list[Unit] = []
        for i, (m, params) in enumerate(list(zip(mods, owned)) + [(model, root)]):
            entries = frozen.get(i if i < len(mods) else None)
            if not params and not entries:
                continue
            if params:
                params = sorted(params, key=lambda p: group_of[id(p)])  # stable: each group contiguous
                u = self._make_unit(params, [group_of[id(p)] for p in params], opt_groups)
            else:
                u = Unit(None, None, [], None, None, self.reduce_dtype)
            if entries:
                u.frozen = FrozenBytes(entries, comm, self.device)
            u.module = m
            self.units.append(u)
        for p in model.parameters():  # anything left on meta (a frozen tensor is in a unit's bytes now)
            if p.is_meta:
                make_real(p, materialized(p, self.device))
        self.root = self.units[-1] if self.units and self.units[-1].module is model else None
        self.buffers = [u for u in self.units if u.layout is not None]  # the trainable flat buffers
        self.optimizer = optimizer_factory(opt_groups)
        for u in self.units:
            for p in u.layout.params if u.layout is not None else []:
                p.register_post_accumulate_grad_hook(partial(self._on_grad, u))
            if u is not self.root:
                u.module.register_forward_pre_hook(partial(self._pre_forward, u))
                u.module.register_forward_hook(partial(self._post_forward, u))
        model.register_forward_pre_hook(self._root_pre_forward)
        model.register_forward_hook(self._root_post_forward)
        self._order: list[Unit] = []  # units in the order this forward ran them
        self._last_order: list[Unit] = []
        self._pending: list = []  # (handle, unit, flat grad kept alive, shard out) in flight
        self._in_backward = False  # between the first pre-backward hook and the end-of-backward callback

    def _make_unit(self, params, groups: list[int], opt_groups: list[dict]) -> Unit:
        layout = FlatLayout([self.names[id(p)] for p in params], params, self.comm.size, self.comm.rank)
        if any(p.is_meta for p in params):  # deferred init: this rank makes its shard only
            layout.device = self.device
            master = self._init_shard(layout)
        else:
            master = self._broadcast_flat(layout)[layout.lo:layout.hi].clone()  # (N·s,) fp32 -> (s,)
        shard = master if self.dtype == torch.float32 else master.to(self.dtype)
        full = torch.empty(layout.padded, dtype=self.dtype, device=layout.device)
        for p, v in zip(params, layout.views(full)):
            make_real(p, v)  # views of the unit's storage (p keeps its own version counter)
        pieces = []  # group g covers [start, end) of the flat vector; the last group takes the padding
        for i, g in enumerate(sorted(set(groups))):
            start = layout.offsets[groups.index(g)]
            end = layout.padded if i == len(set(groups)) - 1 else layout.offsets[groups.index(g) + groups.count(g)]
            a, b = max(start, layout.lo) - layout.lo, min(end, layout.hi) - layout.lo
            if a < b:
                pieces.append((master[a:b], a, b))
                opt_groups[g]["params"].append(pieces[-1][0])
        u = Unit(layout, master, pieces, full, shard, self.reduce_dtype)
        self._free(u)
        return u

    def _init_shard(self, layout: FlatLayout) -> torch.Tensor:
        """(s,) fp32: this rank's [lo, hi) of the unit's flat vector, made parameter by parameter
        from each one's initial value (ltk/models/init.py `materialized`: one full parameter at a
        time, freed at once). No communication: every rank computes the same values."""
        master = torch.zeros(layout.shard, dtype=torch.float32, device=layout.device)
        for p, off, n in zip(layout.params, layout.offsets, layout.numels):
            a, b = max(off, layout.lo), min(off + n, layout.hi)
            if a < b:
                full = materialized(p, layout.device).reshape(-1)
                master[a - layout.lo:b - layout.lo] = full[a - off:b - off]
                del full
        return master

    # -- gather / free ----------------------------------------------------------------------------
    def _unshard(self, u: Unit | None, wait: bool = True) -> None:
        """Allocate u's full buffers and all-gather the shards into them (async unless wait):
        the trainable flat vector, and the frozen bytes where the unit has them."""
        if u is None:
            return
        if not u.gathered and not u.handles:
            if u.layout is not None:
                u.full.untyped_storage().resize_(u.layout.padded * u.full.element_size())
                u.handles.append(self.comm.all_gather(u.full, u.shard, async_op=True))
            if u.frozen is not None:
                u.handles.append(u.frozen.gather())
            u.handles = [h for h in u.handles if h is not None]
            u.gathered = not u.handles  # one rank: copied at once
        if wait and u.handles:
            for h in u.handles:
                h.wait()
            u.handles, u.gathered = [], True

    def _free(self, u: Unit) -> None:
        for h in u.handles:  # never free storage an all-gather is still writing
            h.wait()
        u.handles = []
        if u.layout is not None:
            u.full.untyped_storage().resize_(0)
        if u.frozen is not None:
            u.frozen.free()
        u.gathered, u.free_later = False, False

    def _neighbour(self, u: Unit | None, step: int) -> Unit | None:
        """The unit `step` places after u in the forward order (the previous forward's while
        running forward, this forward's in backward); from the root: the first (+) or last (-)."""
        order = self._last_order or [x for x in self.units if x is not self.root]
        if not order:
            return None
        if u is None or u is self.root:
            return order[0] if step > 0 else order[-1]
        i = next((k for k, x in enumerate(order) if x is u), None)
        return order[i + step] if i is not None and 0 <= i + step < len(order) else None

    # -- forward ------------------------------------------------------------------------------------
    def _root_pre_forward(self, module, args) -> None:
        self._order = []
        self._unshard(self.root)
        if self.prefetch:
            self._unshard(self._neighbour(None, +1), wait=False)

    def _pre_forward(self, u: Unit, module, args) -> None:
        self._unshard(u)
        if self._in_backward:  # activation checkpointing recomputes u inside its backward
            return
        self._order.append(u)
        if self.prefetch:
            self._unshard(self._neighbour(u, +1), wait=False)

    def _post_forward(self, u: Unit, module, args, out) -> None:
        if self._in_backward:  # recomputed: u's backward, which needs the parameters, is next
            return
        self._free(u)
        if torch.is_grad_enabled():
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(partial(self._pre_backward, u))

    def _root_post_forward(self, module, args, out) -> None:
        self._last_order = list(self._order)
        for u in self.units:
            if u.gathered or u.handles:
                self._free(u)  # the root, and a prefetched unit this forward did not use
        if torch.is_grad_enabled():
            for t in _tensors(out):
                if t.requires_grad:
                    t.register_hook(partial(self._pre_backward, self.root))

    # -- backward -----------------------------------------------------------------------------------
    def _pre_backward(self, u: Unit | None, grad) -> None:
        if not self._in_backward:  # once per backward: finish what the hooks started
            Variable._execution_engine.queue_callback(self._end_backward)
            self._in_backward = True
        for v in self.units:  # units whose backward has passed (frozen weights: freed late, see _reduce)
            if v.free_later and v is not u:
                self._free(v)
        if u is not None and u.reduced:
            return
        self._unshard(u)
        if self.prefetch:
            self._unshard(self._neighbour(u, -1), wait=False)

    def _on_grad(self, u: Unit, p: nn.Parameter) -> None:
        u.ready += 1
        if u.ready == len(u.layout.params):
            self._reduce(u)

    def _reduce(self, u: Unit) -> None:
        flat = u.layout.flatten([p.grad for p in u.layout.params], self.reduce_dtype)  # (N·s,)
        for p in u.layout.params:
            p.grad = None
        out = torch.empty_like(u.grad_shard)
        self._pending.append((self.comm.reduce_scatter(out, flat, async_op=True), u, flat, out))
        u.reduced = True
        if u.frozen is None:
            self._free(u)
        elif u is not self.root:
            # LoRA's A and B get their gradients in nodes of their own, which autograd may run before
            # the frozen W's node (x·Wᵀ's dx needs W): keep the unit until the backward has left it,
            # i.e. until the next unit's pre-backward hook (or the end of the backward)
            u.free_later = True
        while len(self._pending) > self.max_in_flight:  # each holds a whole unit's flat gradient
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        handle, u, _, out = self._pending.pop(0)
        if handle is not None:
            handle.wait()
        u.grad_shard += out

    def _end_backward(self) -> None:
        for u in self.buffers:
            if not u.reduced:
                self._reduce(u)
        while self._pending:
            self._finish_oldest()
        for u in self.units:
            if u.gathered or u.handles:  # the root, units with frozen tensors
                self._free(u)
            u.ready, u.reduced = 0, False
        self._pending, self._in_backward = [], False

    # -- step -----------------------------------------------------------------------------------------
    def _reduced_grad_shards(self) -> list[torch.Tensor]:
        return [u.grad_shard for u in self.buffers]

    def step(self) -> None:
        """Optimizer step on the fp32 master shards; the compute-dtype shard follows. No collective."""
        self._prepare_grads()
        self.optimizer.step()
        for u in self.buffers:
            if u.shard is not u.master:
                u.shard.copy_(u.master)

    def zero_grad(self) -> None:
        self._zero_master_grads()
        for u in self.buffers:
            u.grad_shard.zero_()
            for p in u.layout.params:
                p.grad = None

    def _param_tensors(self):
        return [u.shard for u in self.buffers] + [u.full for u in self.buffers]

    def _grad_tensors(self):
        return [u.grad_shard for u in self.buffers]

    def frozen_bytes(self) -> dict[str, int]:
        """Bytes of the frozen tensors: `shard` held at rest by this rank, `total` of the whole model
        (unpadded, each tensor once), `gathered` allocated now (0 between steps)."""
        fz = [u.frozen for u in self.units if u.frozen is not None]
        return {"shard": sum(f.shard_bytes for f in fz), "total": sum(sum(f.nbytes) for f in fz),
                "gathered": sum(f.full.untyped_storage().nbytes() for f in fz)}

    def state_bytes(self) -> dict[str, int]:
        out = super().state_bytes()
        fz = self.frozen_bytes()
        out["params"] += fz["shard"] + fz["gathered"]
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """As ShardedEngine's, the frozen tensors too (gathered unit by unit: a collective)."""
        values: dict = {}  # id(parameter) or (id(module), buffer name) -> the whole tensor
        for u in self.units:
            if u.frozen is not None:
                for e, v in zip(u.frozen.entries, u.frozen.values().values()):
                    values[id(e.tensor) if e.is_param else (id(e.module), e.attr)] = v
        for buf in self.buffers:
            for p, v in zip(buf.layout.params, self._gather_flat(buf, buf.master)):
                values[id(p)] = v
        by_key = {}
        for mod_name, mod in self.module.named_modules():
            for k in mod._buffers:
                if (id(mod), k) in values:
                    by_key[(mod_name + "." if mod_name else "") + k] = values[(id(mod), k)]
        out = {}
        for k, t in self.module.state_dict(keep_vars=True).items():
            v = by_key[k] if k in by_key else values.get(id(t))
            out[k] = v if v is not None else t.detach().clone()
        return out
