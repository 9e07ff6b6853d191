"""One interface over every way `ltk train` can spread a step over ranks, so the training loop
stays the same loop whatever the strategy (ltk/training/trainer.py calls this, nothing else here).

    strategy     the data-parallel engine over the dp axis of the mesh:
                 ddp (bucketed, overlapped), naive-ddp, zero1, zero2, zero3 (ltk/parallel/),
                 torch-ddp (PyTorch's DistributedDataParallel), or none; or one of PyTorch's
                 DTensor engines (ltk/parallel/fsdp2.py): fsdp2 (fully_shard over dp, with
                 DTensor TP when tp > 1), torch-tp (DTensor TP over every rank)
    tp           tensor-parallel degree (ltk/parallel/tp_plan.py: GPT and Llama; under the
                 DTensor engines ltk/parallel/torch_tp.py)
    cp           context-parallel degree: each sequence split over cp ranks (ltk/parallel/cp_train.py);
                 the engine then reduces gradients and shards states over the dp x cp ranks

The global batch is the same whatever the world size: every rank reads the same global
micro-batch and trains on its data-parallel block of rows (ltk/parallel/reference.py `dp_shard`),
so a run on N ranks is comparable step by step with a run on one. Tensor-parallel ranks of one
data-parallel replica read the same rows.

Checkpoints are single-process checkpoints: `full_state_dict` gathers every parameter under its
name and `optimizer_state_dict` gives the optimizer state by parameter name, so a run saved on
N ranks resumes on M (or on one) through `load_optimizer_state_dict`.

Beside this file: the data-parallel engines and their factory (ltk/parallel/dp_engines.py,
`build_engine`), weights and optimizer state by name (ltk/parallel/named_state.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from ltk.parallel.dist import Mesh
from ltk.parallel.dp_engines import TORCH_ENGINES, build_engine
from ltk.parallel.mixed import MasterOptimizer, as_dtype
from ltk.parallel.named_state import by_name_state, load_by_name_state, param_names, unwrapped
from ltk.parallel.reference import dp_shard
from ltk.parallel.sharded_eval import EvalShare, sum_over, tp_eval_sums


class ParallelRun:
    """The mesh, the engine and the data split of one rank (see the module docstring)."""

    def __init__(self, model, param_groups_fn: Callable, optimizer_factory: Callable, *, strategy: str = "auto",
                 tp: int = 1, pp: int = 1, sequence_parallel: bool = False, device: torch.device | None = None,
                 compute_dtype: str = "fp32", bucket_mb: float = 25.0, reduce_dtype: str | None = None,
                 reshard_after_forward: bool = True, batch_size: int | None = None, grad_clip: float = math.inf,
                 cp: int = 1, cp_impl: str = "ring", cp_layout: str = "zigzag"):
        world = dist.get_world_size() if dist.is_initialized() else 1
        # the parameters a checkpoint holds: None = every one; with an adapter the trainable ones
        # (ltk/training/adapters.py), the frozen base referenced, not copied
        self.checkpoint_names: set[str] | None = None
        if pp != 1:
            raise ValueError("pipeline parallelism runs through ltk/parallel/pipeline.py's trainer, not ParallelRun")
        if world % (tp * cp):
            raise ValueError(f"--parallel.tp {tp} x --parallel.cp {cp} does not divide the world size {world}")
        self.mesh = Mesh.build(dp=world // (tp * cp), tp=tp, pp=1, cp=cp)
        self.dp_size, self.dp_rank = self.mesh.dp, self.mesh.coords["dp"]  # the data split: rows
        self.cp_rank = self.mesh.coords["cp"]
        grads = self.mesh.comm("dp_cp")  # the ranks that hold the same parameters (dp x cp)
        self.tp = tp
        if strategy == "auto":  # PyTorch's DDP alone; ours with tensor parallelism (it needs our forward)
            strategy = "none" if grads.size == 1 else "ddp" if tp > 1 else "torch-ddp"
        if strategy == "none" and grads.size > 1:
            raise ValueError(f"strategy 'none' with {grads.size} data-parallel (dp x cp) ranks would never average "
                             "their gradients: name an engine (ddp, zero1, ...) or leave it on auto")
        if tp > 1 and strategy == "torch-ddp":
            raise ValueError("torch-ddp does not combine with --parallel.tp here: use ddp, naive-ddp, zero1 or zero2")
        self.strategy = strategy
        self.dtensor = strategy in TORCH_ENGINES
        self.compute_dtype = as_dtype(compute_dtype)
        if self.dtensor:
            from ltk.parallel.fsdp2 import build_torch_engine

            if sequence_parallel and tp == 1:
                raise ValueError(f"{strategy} with sequence parallelism needs tensor parallelism (tp > 1): "
                                 "it splits the tensor-parallel group's work over the sequence")
            self.engine = build_torch_engine(model, param_groups_fn, optimizer_factory, strategy=strategy,
                                             dp=grads.size, tp=tp, device=device or torch.device("cpu"),
                                             compute_dtype=compute_dtype, reduce_dtype=reduce_dtype,
                                             reshard_after_forward=reshard_after_forward,
                                             sequence_parallel=sequence_parallel)
            self.model = model
            self.cp = self._context_parallel(cp, cp_impl, cp_layout)
            return
        if tp > 1:
            from ltk.parallel.tp_plan import apply_tensor_parallel

            model = apply_tensor_parallel(model, self.mesh.comm("tp"), sequence_parallel=sequence_parallel)
        self.model = model
        self.engine = build_engine(strategy, model, param_groups_fn(model), optimizer_factory, grads,
                                   device or torch.device("cpu"), compute_dtype, bucket_mb, reduce_dtype,
                                   micro_batch=max(1, (batch_size or self.dp_size) // self.dp_size),
                                   grad_clip=grad_clip)
        self.cp = self._context_parallel(cp, cp_impl, cp_layout)

    def _context_parallel(self, cp: int, impl: str, layout: str):
        """The CP setting the model's attention reads (ltk/parallel/cp_train.py), None at cp 1."""
        if cp == 1:
            return None
        from ltk.parallel.context_parallel import ContextParallel
        from ltk.parallel.cp_train import attach

        setting = ContextParallel(self.mesh.comm("cp"), method=impl, layout=layout)
        attach(unwrapped(self.model), setting)
        return setting

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of a global micro-batch."""
        return dp_shard(t, self.dp_rank, self.dp_size) if self.dp_size > 1 else t

    def loss(self, objective, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, *extra) -> torch.Tensor:
        """The objective's loss through the engine; under tensor parallelism the vocab-parallel
        cross-entropy of ltk/parallel/tp_plan.py (the full logits are never gathered). `extra`: the
        batch's further tensors, this rank's rows (packed instruction rows: their segment ids)."""
        if self.cp is not None:  # this rank's sequence shard, the loss scaled for dp x cp (cp_train.py)
            from ltk.parallel.cp_train import cp_loss, tp_mean_loss

            if objective.name != "causal-lm" or extra:
                raise ValueError(f"context parallelism trains the causal LM objective on unpacked rows, not "
                                 f"{objective.name}{' with segment ids' if extra else ''}")
            mean = tp_mean_loss(self.model) if self.tp > 1 else lambda xs, ys: objective.loss(self.engine, xs, ys, gen)
            return cp_loss(self.cp, mean, x, y)
        if self.tp > 1:
            from ltk.parallel.tp_plan import tp_loss

            if objective.name != "causal-lm":
                raise ValueError(f"tensor parallelism trains the causal LM objective, not {objective.name}")
            return tp_loss(self.model, x, y)  # our engines act through hooks: the module's forward is theirs
        return objective.loss(self.engine, x, y, gen, *extra)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global gradient norm (clipped to max_norm when finite). Under tensor parallelism a
        rank holds 1/tp of each split parameter and a full copy of each replicated one (norms,
        row-parallel biases), so ‖g‖² = Σ_tp-ranks (Σ_split ‖g_p‖² + Σ_replicated ‖g_p‖² / tp)."""
        if self.tp == 1 or self.dtensor:
            return self.engine.clip_grad_norm_(max_norm)
        from ltk.parallel.tp_plan import split_parameters

        split = split_parameters(self.model)
        weight = {n: 1.0 if id(p) in split else 1.0 / self.tp for n, p in self.model.named_parameters()}
        if self.strategy in ("zero1", "zero2", "zero3"):  # gradients live as averaged fp32 shards of flat buffers
            self.engine._prepare_grads()
            grads, weights = [], []
            for buf in self.engine.buffers:
                lay = buf.layout
                w = lay.flatten([torch.full(p.shape, weight[n]) for n, p in zip(lay.names, lay.params)], torch.float32)
                grads.append(buf.grad32)
                weights.append(w[lay.lo:lay.hi])
            reduce = [self.mesh.comm("dp_cp"), self.mesh.comm("tp")]  # shards over dp x cp, splits over tp
        else:  # every rank holds its averaged per-parameter gradients
            if hasattr(self.engine, "_grads_ready"):
                self.engine._grads_ready()
            opt = self.engine.optimizer
            if isinstance(opt, MasterOptimizer):  # the fp32 master gradients, clipped in place
                self.engine.prepare_master_grads() if hasattr(self.engine, "prepare_master_grads") \
                    else opt.prepare_grads()
                named = [(n, opt.master_of[id(p)].grad) for n, p in self.model.named_parameters()
                         if opt.master_of[id(p)].grad is not None]
            else:
                named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
            grads = [g for _, g in named]
            weights = [weight[n] for n, _ in named]
            reduce = [self.mesh.comm("tp")]
        sq = torch.zeros((), dtype=torch.float32)
        for g, w in zip(grads, weights):
            sq += (g.float().pow(2) * w).sum()
        for comm in reduce:
            comm.all_reduce(sq)
        norm = sq.sqrt().item()
        if math.isfinite(max_norm):
            coef = min(1.0, max_norm / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
            for g in grads:
                g.mul_(coef)
        return norm

    def _whole_locally(self) -> bool:
        """Does this rank hold every parameter, full size, between steps? (bf16 under mixed
        precision: evaluation then runs in the compute dtype, as training does)"""
        return self.tp == 1 and self.strategy not in ("zero3", "fsdp2", "deepspeed-zero3")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process state dict, fp32 masters under mixed precision (a collective where
        parameters are sharded). Tensor parallel: this rank's slices, whole over dp (the engine's
        state dict), then unsharded over tp as each parameter's layer cuts it."""
        if hasattr(self.engine, "wait_params"):  # ZeRO-1/2: the step's parameter all-gathers may be in flight
            self.engine.wait_params()
        if self.tp > 1 and not self.dtensor:
            from ltk.parallel.tp_plan import gather_tp_like, gather_tp_params

            if self.strategy in ("zero1", "zero2", "zero3") or isinstance(self.engine.optimizer, MasterOptimizer):
                return self._complete(gather_tp_like(self.model, self.engine.full_state_dict()))
            return self._complete(gather_tp_params(self.model))
        return self._complete(self.engine.full_state_dict())

    def _complete(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every key of the module's state dict: a tied alias an engine listed once (GPT's
        lm_head.weight is wte.weight) gets the value of the name it shares storage with."""
        own = unwrapped(self.model).state_dict(keep_vars=True)
        ptr = {}
        for k, t in own.items():
            ptr.setdefault(t.untyped_storage().data_ptr(), []).append(k)
        out = {}
        for k, t in own.items():
            if k in sd:
                out[k] = sd[k].contiguous()
            else:
                twin = next((n for n in ptr[t.untyped_storage().data_ptr()] if n in sd), None)
                if twin is None:
                    raise KeyError(f"the engine's state dict lacks {k!r}")
                out[k] = out[twin] if twin in out else sd[twin].contiguous()
        return out

    def eval_share(self, objective) -> EvalShare:
        """How this rank takes part in evaluation, on the model as it is held (never a second
        copy; ltk/parallel/sharded_eval.py): each data-parallel replica scores its share of the
        batches; ZeRO-3 gathers unit by unit in forward, tensor parallelism scores from the
        vocabulary slice of the logits."""
        dp = self.mesh.comm("dp")
        if hasattr(self.engine, "wait_params"):  # the forward's pre-hooks wait too; generation reads weights outside it
            self.engine.wait_params()
        if self.cp is not None:  # the cp ranks of a replica score shards of the same batches: add over both
            from ltk.parallel.cp_train import eval_sums

            return EvalShare(model=unwrapped(self.model), rank=self.dp_rank, size=self.dp_size,
                             lockstep=not self._whole_locally(), all_reduce=sum_over(dp, self.mesh.comm("cp")),
                             eval_sums=eval_sums(self.cp, self.tp > 1))
        return EvalShare(model=unwrapped(self.model), rank=self.dp_rank, size=self.dp_size,
                         lockstep=not self._whole_locally(), all_reduce=sum_over(dp),
                         eval_sums=tp_eval_sums(objective) if self.tp > 1 else None)

    def checkpoint_view(self):
        """What a checkpoint writes and reads: this run, or — where the engine keeps its state in
        its own structures (DeepSpeed) — a snapshot of it as whole tensors (collective)."""
        snapshot = getattr(self.engine, "snapshot", None)
        if snapshot is None:
            return self
        from ltk.parallel.deepspeed_engine import SnapshotRun

        return SnapshotRun(self, snapshot())

    def _names(self) -> dict[int, str]:
        return param_names(self.model, self.engine.optimizer)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The single-process optimizer state by parameter name, whatever the engine and the
        tensor-parallel degree (a collective for ZeRO and tensor parallelism)."""
        if self.strategy in ("ddp", "naive-ddp"):  # replicated torch optimizer: name its entries
            sd = by_name_state(self.engine.optimizer, self._names())
        else:
            sd = self.engine.optimizer_state_dict()
        if self.tp > 1 and not self.dtensor:
            from ltk.parallel.tp_plan import gather_tp_like

            for key in _moment_keys(sd):
                full = gather_tp_like(self.model, {n: st[key] for n, st in sd["state"].items()})
                for n, t in full.items():
                    sd["state"][n][key] = t
        return sd

    def load_optimizer_state_dict(self, sd: dict[str, Any], build: Callable[[], torch.nn.Module] | None = None) -> None:
        """Load a state saved by optimizer_state_dict at any world size (under tensor
        parallelism `build` makes a full single-device model to cut the moments like the weights)."""
        if self.tp > 1 and not self.dtensor:
            from ltk.parallel.tp_plan import shard_tp_like

            if build is None:
                raise ValueError("resuming a tensor-parallel run needs a model builder to shard the optimizer state")
            sd = {"state": {n: dict(st) for n, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
            for key in _moment_keys(sd):
                local = shard_tp_like(build, {n: st[key] for n, st in sd["state"].items()}, self.mesh.comm("tp"),
                                      getattr(self.model, "sequence_parallel", False))
                for n, t in local.items():
                    sd["state"][n][key] = t
        if self.strategy in ("ddp", "naive-ddp"):
            load_by_name_state(self.engine.optimizer, self._names(), sd)
        else:
            self.engine.load_optimizer_state_dict(sd)


def _moment_keys(sd: dict[str, Any]) -> list[str]:
    """State entries shaped like their parameter (Adam's exp_avg, exp_avg_sq), not step counters."""
    first = next(iter(sd["state"].values()), {})
    return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)
