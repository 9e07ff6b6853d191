"""Pipeline x FSDP2 (torchtitan's PP x FSDP, Liang et al. 2024): torch.distributed.pipelining's
schedules (torch_pipeline.py) over the pp axis, every stage fully_shard-ed over the dp axis
(`ltk train --parallel fsdp2 --parallel.pp P --parallel.pp_engine torch`).

Layout: the (pp, dp) DeviceMesh in pipeline_run.py's order, rank = pp_index·dp + dp_index; each
stage's blocks, then the chunk itself (embeddings, final norm, head), fully_shard-ed over the
dp sub-mesh of its pp row, so a parameter is a DTensor Shard(0) over the dp ranks holding its stage.

    pp = 2, dp = 2:   stage 0 on ranks {0, 1}: wte, wpe, blocks 0..L/2 sharded in two
                      stage 1 on ranks {2, 3}: blocks L/2..L, ln_f, lm_head sharded in two

One step, against pipeline_run.py's (its module docstring):

    1. torch's schedule runs the FSDP stages (torch.distributed.pipelining's stage.py): every
       micro-batch's backward with requires_gradient_sync and reshard_after_backward off, so the
       stage's whole gradients accumulate over the m micro-batches; after the last, its
       REDUCE_GRAD action runs FSDP2's post-backward: one reduce-scatter per block, the mean over
       dp, then the 1/m scaling. Each rank ends with the Shard(0) block of
       g_p = (1/(dp·m)) Σ over all dp·m micro-batches — step 2's mean, no separate all-reduce.
    2. the tied embedding: stage 0's W_te and the last stage's copy are sharded alike over dp
       (the same rows on the same dp index), so the embedding group {first, last} of each
       pipeline sums the local shards of their gradients, as pipeline.py sums whole ones.
    3. ‖g‖² = Σ over local shards (the last stage's tied copy left out), all-reduced over pp
       and over dp: the shards are disjoint, each element counted once.

Memory: while a step runs, a stage holds its parameters gathered and its gradients whole (the
schedule turns resharding off between micro-batches); between steps only the 1/dp shards and
AdamW's sharded moments remain (ltk/parallel/plan.py counts the gathered stage).

Mixed precision as fsdp2.py: MixedPrecisionPolicy(param_dtype = the compute dtype, reduce_dtype),
the sharded parameters stay fp32 and are what AdamW updates, so no MasterOptimizer; activations
crossing stages travel in the compute dtype.

Checkpoints: each rank's boxes are its DTensor shards under the single-process names
(shard_state.local_boxes), written by every dp rank, the tied copy held but never written; so a
run saved here resumes on one process, under our pipeline or fsdp2, and the other way round,
and `ltk generate` / `ltk export --hf` read it.

What does not compose (ltk/training/config_check_engines.py refuses it): fsdp2 x tp x pp (a 3-D mesh;
not wired), and FSDP2 under the lab's executor (its hand-written schedule does not drive FSDP's
no_sync / post-backward; use this one, or --parallel ddp --parallel.pp N).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ltk.models.gpt import GPT
from ltk.parallel.fsdp2 import shard_model
from ltk.parallel.mixed import as_dtype
from ltk.parallel.pipeline import GPTStage
from ltk.parallel.pipeline_run import PipelineRun


class FSDPPipelineRun(PipelineRun):
    """PipelineRun (engine "torch") whose stages are FSDP2 modules over the dp axis."""

    dtensor = True  # its parameters are DTensors: shard_state reads their local shards
    strategy = "pipeline-fsdp2"  # the layout a sharded checkpoint's index records

    def __init__(self, model: GPT, param_groups_fn: Callable[[nn.Module], list[dict]],
                 optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer], *, pp: int,
                 schedule: str = "1f1b", virtual: int = 1, micro_batches: int, compute_dtype: str = "fp32",
                 reduce_dtype: str | None = None, device: torch.device | str | None = None,
                 reshard_after_forward: bool = True):
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if dist.is_initialized() else 1
        if not isinstance(pp, int) or pp < 1 or world % pp:
            raise ValueError(f"pp={pp!r} does not divide the world size {world}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # before PipelineRun's groups: every rank creates the same groups in the same order
        self.device_mesh = init_device_mesh(dev.type, (pp, world // pp), mesh_dim_names=("pp", "dp"))
        self._fsdp = dict(compute_dtype=compute_dtype, reduce_dtype=reduce_dtype or compute_dtype,
                          reshard_after_forward=reshard_after_forward)
        super().__init__(model, param_groups_fn, optimizer_factory, pp=pp, schedule=schedule, virtual=virtual,
                         micro_batches=micro_batches, compute_dtype=compute_dtype, reduce_dtype=reduce_dtype,
                         device=device, engine="torch")
        self.trainer.dtype = as_dtype(compute_dtype)  # the stage boundary's dtype (evaluation's receive buffers)
        self._norm_comms = [self.pp_comm, self.dp_comm]  # step 3: shards over dp, stages over pp

    def _factory(self, optimizer_factory: Callable, compute_dtype: str) -> Callable:
        return optimizer_factory  # the fp32 shards are the masters; FSDP2 casts for compute

    def _build_optimizer(self, chunks: list[GPTStage], factory: Callable) -> torch.optim.Optimizer:
        """fully_shard each chunk (its blocks, then itself) over dp, then the optimizer on the shards:
        called by the executor before torch's PipelineStage wraps the chunks."""
        for c in chunks:
            shard_model(c, self.device_mesh["dp"], block_list=list(c.h.values()), **self._fsdp)
        return super()._build_optimizer(chunks, factory)

    def _reduce_over_dp(self) -> None:
        """Nothing to do: FSDP2 reduce-scattered the mean over dp inside the schedule (step 1)."""

    def reshard(self) -> None:
        """Free gathered parameters, the sharded DTensors registered again. An evaluation forward
        leaves the chunk roots gathered (not resharded after forward); whatever reads parameters
        by name (checkpoints) calls this first."""
        from torch.distributed.fsdp import FSDPModule

        for c in self.chunks:
            for mod in c.modules():
                if isinstance(mod, FSDPModule):
                    mod.reshard()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        self.reshard()
        return super().full_state_dict()  # DTensors gathered whole (pipeline_run._clone)

    def optimizer_state_dict(self) -> dict:
        self.reshard()
        return super().optimizer_state_dict()

    def load_optimizer_state_dict(self, sd: dict) -> None:
        raise NotImplementedError("pipeline x fsdp2 loads optimizer state from sharded checkpoints "
                                  "(ltk/training/reshard.py), box by box")
