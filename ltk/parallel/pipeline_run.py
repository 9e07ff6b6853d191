"""Pipeline x data parallelism for the training loop: ltk/parallel/pipeline.py's executor on the
pp axis of a mesh, replicated over its dp axis, with the single-process views a trainer needs
(global loss, global gradient norm, full weights and optimizer state by name).

Layout (ltk/parallel/dist.py, Megatron's PTD-P order, Narayanan et al. 2021 §3): world = pp x dp,
rank = pp_index·dp + dp_index. A pipeline is the pp ranks sharing a dp index; a data-parallel
group is the dp ranks holding the same stages:

    pp = 2, dp = 2:    pipeline 0 = ranks {0, 2}     dp group of stage 0 = {0, 1}
                       pipeline 1 = ranks {1, 3}     dp group of stage 1 = {2, 3}

One step, on each rank (the global batch B rows, each pipeline its B/dp rows cut into m
micro-batches of b = B/(dp·m) rows):

    1. the schedule (gpipe, 1f1b, interleaved): g_p^(j) = Σ_i ∂(ℓ_i / m)/∂p over the pipeline's
       micro-batches; the tied embedding's two copies summed (pipeline.py)
    2. data parallel: g_p = (1/dp) Σ_j g_p^(j), one all-reduce of the rank's flat gradients
       over its dp group (payload 4·Ψ_rank bytes in fp32, cost.zero_comm_bytes stage 0). Then
       g_p = ∂L/∂p for L = (1/(dp·m)) Σ over all dp·m micro-batches of their mean loss: the
       full-batch mean, as one process accumulating dp·m micro-batches with loss / (dp·m).
    3. loss: the last stage holds Σ_i ℓ_i / m; broadcast within the pipeline, averaged over dp.

The global gradient norm (for clipping) sums squares once per parameter of the model:

    ‖g‖² = Σ_pipeline ranks Σ_local p ‖g_p‖²,   the last stage's copy of W_te left out

(after step 1 both copies hold the tied gradient; counting both would count it twice), one
all-reduce of a scalar over the pipeline group. The dp replicas hold equal gradients after
step 2, so every rank gets the same norm and clips the same way (torch's rule, coef =
min(1, max_norm / (‖g‖ + 1e-6))).

Mixed precision (compute_dtype bf16, ltk/parallel/mixed.py): the stages' parameters are bf16, so
are the activations and gradients crossing stage boundaries, the tied-weight all-reduce and the
dp all-reduce (reduce_dtype fp32: that one on an fp32 copy); AdamW updates fp32 masters, and the
norm is taken and clipped on their fp32 gradients. Checkpoints hold the masters.

Executors. `engine="ltk"` runs the schedule with the lab's executor (pipeline.py); "torch" runs
the same stages under torch.distributed.pipelining's schedules (torch_pipeline.py,
`--parallel torch-pp`): everything on this page holds for both.

Names. The stages keep the full model's parameter names (GPTStage), the tied copy being
`lm_head.weight`; the single-process name of the tied tensor is `wte.weight`, the name
GPT.named_parameters gives it. Optimizer groups, state dicts and checkpoints use those names,
so a run saved under one layout (pp, dp, schedule, v) resumes under another or on one process.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ltk.models.gpt import GPT
from ltk.parallel.dist import Mesh
from ltk.parallel.fsdp2 import local
from ltk.parallel.mixed import MasterOptimizer, as_dtype, mixed_factory
from ltk.parallel.pipeline import GPTStage, PipelineComms, PipelineTrainer, StepTimings
from ltk.parallel.reference import dp_shard
from ltk.parallel.schedules import make_schedule


def _is_tied_copy(chunk: GPTStage, name: str) -> bool:
    """The last stage's own copy of W_te (its first-stage twin lives in another chunk)."""
    return name == "lm_head.weight" and chunk.last and not chunk.first


def _clone(v: Any) -> Any:
    """A copy of v; a DTensor (an FSDP2 shard, torch_pp_fsdp.py) whole: collective over its mesh."""
    if isinstance(v, DTensor):
        return v.full_tensor()
    return v.detach().clone() if torch.is_tensor(v) else v


class PipelineRun:
    """One rank of a pipelined, data-parallel GPT (see the module docstring)."""

    def __init__(self, model: GPT, param_groups_fn: Callable[[nn.Module], list[dict]],
                 optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer], *, pp: int,
                 schedule: str = "1f1b", virtual: int = 1, micro_batches: int, compute_dtype: str = "fp32",
                 reduce_dtype: str | None = None, device: torch.device | str | None = None, engine: str = "ltk"):
        if not isinstance(model, GPT):
            raise TypeError(f"pipeline parallelism cuts a models.gpt.GPT into stages, got {type(model).__name__}")
        for name, val in (("pp", pp), ("virtual", virtual), ("micro_batches", micro_batches)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if schedule == "interleaved" and micro_batches % pp:
            raise ValueError(f"the interleaved schedule runs micro-batches in groups of pp: micro_batches="
                             f"{micro_batches} is not a multiple of pp={pp}")
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % pp:
            raise ValueError(f"pp={pp} does not divide the world size {world}")
        self.schedule = make_schedule(schedule, pp, micro_batches, virtual)
        self.mesh = Mesh.build(dp=world // pp, tp=1, pp=pp)
        self.dp_rank, self.dp_size, self.pp_rank = self.mesh.coords["dp"], self.mesh.dp, self.mesh.coords["pp"]
        self.pp_comm, self.dp_comm = self.mesh.comm("pp"), self.mesh.comm("dp")
        me = dist.get_rank() if dist.is_initialized() else 0
        comms = None
        for ranks in self.mesh.groups_along("pp"):  # collective: every rank builds every pipeline's groups
            built = PipelineComms.build(ranks)
            if me in ranks:
                comms = built

        # the full model's names: every alias of a tensor -> its single-process name (the first)
        canonical: dict[int, str] = {}
        self._alias: dict[str, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._alias[n] = canonical.setdefault(id(p), n)
        full_groups = param_groups_fn(model)
        self._group_names = self._full_group_names(model, full_groups, canonical)
        self._group_keys = [{k: v for k, v in g.items() if k != "params"} for g in full_groups]  # weight_decay, ...
        self._keys = list(model.state_dict().keys())
        factory = self._factory(optimizer_factory, compute_dtype)
        if engine not in ("ltk", "torch"):
            raise ValueError(f"pipeline engine must be 'ltk' (pipeline.py) or 'torch' (torch_pipeline.py), "
                             f"got {engine!r}")
        if engine == "torch":  # torch.distributed.pipelining runs the same stages
            from ltk.parallel.torch_pipeline import TorchPipelineTrainer as executor
        else:
            executor = PipelineTrainer
        self.trainer = executor(model, self.schedule, comms, device=device,
                                optimizer=lambda chunks: self._build_optimizer(chunks, factory))
        self.chunks = self.trainer.chunks
        self.optimizer = self.trainer.opt
        self.mixed = isinstance(self.optimizer, MasterOptimizer)
        self.reduce_dtype = as_dtype(reduce_dtype or compute_dtype)
        self._reduced: dict[int, torch.Tensor] = {}  # id(param) -> fp32 mean gradient (reduce_dtype fp32)
        # (single-process name, parameter, counted in the norm) for every local parameter
        self._params = [(self._alias[n], p, not _is_tied_copy(c, n))
                        for c in self.chunks for n, p in c.named_parameters()]
        self._norm_comms = [self.pp_comm]  # the groups whose ranks hold distinct parts of ‖g‖²
        self.last_timings = StepTimings()

    def _factory(self, optimizer_factory: Callable, compute_dtype: str) -> Callable:
        """The optimizer over this rank's stages: bf16 stages with fp32 masters (mixed.py) unless fp32."""
        return mixed_factory(optimizer_factory, compute_dtype)  # casts the stages' parameters

    @staticmethod
    def _full_group_names(model: GPT, groups: list[dict], canonical: dict[int, str]) -> list[list[str]]:
        names, seen = [], set()
        for i, g in enumerate(groups):
            names.append([])
            for p in g["params"]:
                if id(p) not in canonical:
                    raise ValueError(f"param group {i} holds a tensor of shape {tuple(p.shape)} "
                                     "that is not a parameter of the model")
                n = canonical[id(p)]
                if n in seen:
                    raise ValueError(f"parameter {n} appears in two param groups")
                seen.add(n)
                names[-1].append(n)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in seen]
        if missing:
            raise ValueError(f"trainable parameters in no param group: {missing}")
        return names

    def _build_optimizer(self, chunks: list[GPTStage], factory: Callable) -> torch.optim.Optimizer:
        """The full model's groups kept to this rank's parameters (both copies of W_te in its group)."""
        local: dict[str, list[nn.Parameter]] = {}
        for c in chunks:
            for n, p in c.named_parameters():
                local.setdefault(self._alias[n], []).append(p)
        groups = [{**keys, "params": [p for n in names for p in local.pop(n, [])]}
                  for keys, names in zip(self._group_keys, self._group_names)]
        if local:
            raise ValueError(f"parameters of this rank's stages are in no param group: {sorted(local)}")
        opt = factory(groups)
        if len(opt.param_groups) != len(groups):
            raise ValueError(f"the optimizer factory made {len(opt.param_groups)} param groups from {len(groups)}")
        return opt

    # -- the step --------------------------------------------------------------------------
    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of rows of a global batch (its pipeline's share)."""
        return dp_shard(t, self.dp_rank, self.dp_size) if self.dp_size > 1 else t

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Steps 1-3 of the module docstring on this dp rank's rows x, y (rows, T). Returns the
        global mean loss, the same float on every rank."""
        m = self.schedule.micro_batches
        if x.dim() != 2 or x.shape != y.shape:
            raise ValueError(f"x and y must be (rows, T) token ids of one shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] % m:
            raise ValueError(f"{x.shape[0]} rows of this data-parallel rank do not split into {m} equal micro-batches")
        loss, tm = self.trainer.forward_backward(x, y)
        t1 = time.perf_counter()
        if self.dp_size > 1:
            self._reduce_over_dp()
        total = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64, device=self.trainer.device)
        self.pp_comm.broadcast(total, src=self.pp_comm.size - 1)  # the last stage's rank of the pipeline
        self.dp_comm.all_reduce(total)
        tm.other += time.perf_counter() - t1
        self.last_timings = tm
        return total.item() / self.dp_size

    def _reduce_over_dp(self) -> None:
        """Step 2: the mean of the replicas' gradients, one all-reduce of a flat fp32/bf16 bucket."""
        grads = []
        for _, p, _ in self._params:
            if p.grad is None:  # a parameter the forward did not reach: a zero gradient
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1).to(self.reduce_dtype) for g in grads])  # (Ψ_rank,): one bucket
        self.dp_comm.all_reduce(flat)
        flat.div_(self.dp_size)
        off = 0
        for (_, p, _), g in zip(self._params, grads):
            g.copy_(flat[off:off + g.numel()].view_as(g))
            if flat.dtype != g.dtype:  # the masters take the fp32 mean itself
                self._reduced[id(p)] = flat[off:off + g.numel()].view_as(g)
            off += g.numel()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """‖g‖ over the whole model (the tied weight once), all-reduced over the pipeline;
        the gradients scaled by min(1, max_norm / (‖g‖ + 1e-6)) when the norm is finite."""
        t0 = time.perf_counter()
        grads = self._grads()
        sq = torch.zeros((), dtype=torch.float32, device=self.trainer.device)
        for (_, _, counted), g in zip(self._params, grads):
            if counted and g is not None:
                sq += local(g).float().pow(2).sum()  # a DTensor shard: this rank's part of the sum
        for comm in self._norm_comms:
            comm.all_reduce(sq)
        norm = sq.sqrt().item()
        if math.isfinite(max_norm) and math.isfinite(norm):
            coef = min(1.0, max_norm / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
            for g in grads:
                if g is not None:
                    g.mul_(coef)
        self.last_timings.other += time.perf_counter() - t0
        return norm

    def _grads(self) -> list[torch.Tensor | None]:
        """The gradients the optimizer steps on, per local parameter: fp32 master ones under mixed precision."""
        if not self.mixed:
            return [p.grad for _, p, _ in self._params]
        self.optimizer.prepare_grads(self._reduced or None)
        return [self.optimizer.master_of[id(p)].grad for _, p, _ in self._params]

    def _key(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer's state is keyed by: the master under mixed precision."""
        return self.optimizer.master_of[id(p)] if self.mixed else p

    def step(self) -> None:
        t0 = time.perf_counter()
        self._grads()
        self.optimizer.step()
        self._reduced = {}
        self.last_timings.other += time.perf_counter() - t0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._reduced = {}

    # -- single-process views (collectives: every rank calls) ------------------------------
    def _gather(self, local: Any) -> list[Any]:
        if self.pp_comm.size == 1:
            return [local]
        out: list[Any] = [None] * self.pp_comm.size
        dist.all_gather_object(out, local, group=self.pp_comm.group)
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """GPT.state_dict() of the current weights, every key (lm_head.weight is wte.weight)."""
        masters = {id(p): self._key(p) for _, p, _ in self._params}
        local = {k: masters.get(id(t), t).detach().clone() for c in self.chunks
                 for k, t in c.state_dict(keep_vars=True).items() if not _is_tied_copy(c, k)}
        merged: dict[str, torch.Tensor] = {}
        for part in self._gather(local):
            merged.update(part)
        missing = [k for k in self._keys if k not in merged and self._alias.get(k, k) not in merged]
        if missing:
            raise KeyError(f"no stage holds {missing}")
        return {k: merged[k] if k in merged else merged[self._alias[k]] for k in self._keys}

    def optimizer_state_dict(self) -> dict[str, Any]:
        """{"state": {name: {...}}, "param_groups": [{hyper-parameters, "params": [names]}]},
        the form one process with param_groups_fn(model) would give by name."""
        local = {n: {k: _clone(v) for k, v in self.optimizer.state[self._key(p)].items()}
                 for n, p, counted in self._params if counted and self._key(p) in self.optimizer.state}
        state: dict[str, dict] = {}
        for part in self._gather(local):
            state.update(part)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                  for g, names in zip(self.optimizer.param_groups, self._group_names)]
        order = [n for names in self._group_names for n in names if n in state]
        return {"state": {n: state[n] for n in order}, "param_groups": groups}

    def load_optimizer_state_dict(self, sd: dict[str, Any]) -> None:
        """This rank's entries of a by-name state (both copies of the tied weight get wte.weight's)."""
        if len(sd["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(f"optimizer state has {len(sd['param_groups'])} param groups, this run has "
                             f"{len(self.optimizer.param_groups)}")
        name = {id(self._key(p)): n for n, p, _ in self._params}
        for i, (g, saved) in enumerate(zip(self.optimizer.param_groups, sd["param_groups"])):
            wrong = sorted({name[id(p)] for p in g["params"]} - set(saved["params"]))
            if wrong:
                raise ValueError(f"parameters {wrong} are in param group {i} here but not in the saved group {i}")
            g.update({k: v for k, v in saved.items() if k != "params"})
            for p in g["params"]:
                if name[id(p)] in sd["state"]:
                    # clone every tensor, 0-d step counters too: the two copies of W_te read one entry
                    self.optimizer.state[p] = {k: _clone(v) for k, v in sd["state"][name[id(p)]].items()}

    def eval_share(self, objective):
        """Evaluation through the stages themselves (ltk/parallel/sharded_eval.py): each replica
        scores its share of the batches; the pp ranks of a replica run each batch together."""
        from ltk.parallel.sharded_eval import EvalShare, pipeline_eval_sums, sum_over

        if objective.name != "causal-lm":
            raise ValueError(f"pipeline parallelism evaluates the causal LM objective, not {objective.name}")
        return EvalShare(model=nn.ModuleList(self.chunks), rank=self.dp_rank, size=self.dp_size, lockstep=True,
                         all_reduce=sum_over(self.dp_comm, self.pp_comm),
                         eval_sums=lambda model, x, y, gen, token_bytes: pipeline_eval_sums(self, x, y, token_bytes))
