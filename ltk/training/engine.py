"""The engine a training step goes through, chosen from `cfg.parallel`.

One process: the plain model (torch.compile'd where asked). Several: a data-parallel strategy
(ours from ltk/parallel/, or PyTorch's DDP when none is named) over the mesh, tensor parallelism
inside it, or a pipeline (ltk/parallel/pipeline_run.py; its stages under FSDP2 with --parallel
fsdp2, ltk/parallel/torch_pp_fsdp.py) that runs the whole step itself. Model
code stays single-device: the engine wraps it from outside (DESIGN.md). Which combinations each
engine takes is checked before anything is built (ltk/training/config_check.py); what is left
here is what only the built engine knows: its data-parallel size.

--trainer.compile: one process and torch's DDP compile the whole model; our data-parallel
engines (ddp, naive-ddp, zero1/2/3) compile each transformer block in place (`Module.compile`,
as torchtitan does), so the engines' hooks on the blocks (ZeRO-3's gather and free) and on the
parameters (gradient buckets, reduce-scatters) still run around compiled code, and parameter
names do not change. Tensor and pipeline parallelism refuse it (config_check).
"""
from __future__ import annotations

import math

import torch

from ltk.parallel.pipeline_run import PipelineRun
from ltk.parallel.strategy import ParallelRun
from ltk.training.config import RunConfig
from ltk.training.optim import build_optimizer
from ltk.training.runtime import resolve_dtype


def compute_dtype(cfg: RunConfig, device: torch.device | None = None) -> str:
    """The dtype the engines keep parameters and gradients in: bf16 for --trainer.dtype bf16 (an
    fp32 master in the optimizer, ltk/parallel/mixed.py); fp32 otherwise (fp16 runs fp32 weights
    under autocast with a loss scaler)."""
    dtype = cfg.trainer.dtype
    if dtype == "auto":
        dtype = resolve_dtype("auto", device or torch.device("cpu"))
    return "bf16" if dtype == "bf16" else "fp32"


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every child of every nn.ModuleList in place (GPT's and Llama's blocks);
    returns how many. Compilation itself happens at the first call."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList):
            for block in mod:
                block.compile()
                n += 1
    if n == 0:
        raise ValueError(f"--trainer.compile with a data-parallel engine compiles the blocks of a ModuleList; "
                         f"{type(model).__name__} has none")
    return n


def build_engine(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> ParallelRun | PipelineRun:
    """Wrap `model` (already on `device`) in the engine of cfg.parallel, with its AdamW."""
    p, t = cfg.parallel, cfg.trainer
    wd = cfg.optim.weight_decay
    dtype = compute_dtype(cfg, device)
    factory = lambda groups: build_optimizer(groups, cfg.optim, device.type)  # noqa: E731
    if p.pp > 1:  # the pipeline runs the whole step: grad_accum micro-batches flow through the stages
        kw = dict(pp=p.pp, schedule=p.schedule, virtual=p.virtual_stages, micro_batches=t.grad_accum,
                  compute_dtype=dtype, reduce_dtype=None if p.reduce_dtype == "auto" else p.reduce_dtype, device=device)
        if p.strategy == "fsdp2":  # torch's schedules over FSDP2 stages (config_check: pp_engine torch)
            from ltk.parallel.torch_pp_fsdp import FSDPPipelineRun

            run = FSDPPipelineRun(model, lambda mod: mod.param_groups(wd), factory,
                                  reshard_after_forward=p.reshard_after_forward, **kw)
        else:
            run = PipelineRun(model, lambda mod: mod.param_groups(wd), factory, engine=p.pp_engine, **kw)
    else:
        whole = t.compile and p.strategy in ("auto", "none", "torch-ddp")
        if t.compile and not whole:
            compile_blocks(model)
        run = ParallelRun(torch.compile(model) if whole else model, lambda mod: model.param_groups(wd), factory,
                          strategy=p.strategy, tp=p.tp, sequence_parallel=p.sequence_parallel, device=device,
                          compute_dtype=dtype, bucket_mb=p.bucket_mb,
                          reduce_dtype=None if p.reduce_dtype == "auto" else p.reduce_dtype,
                          reshard_after_forward=p.reshard_after_forward, batch_size=t.batch_size,
                          grad_clip=cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf,
                          cp=p.cp, cp_impl=p.cp_impl, cp_layout=p.cp_layout)
    if t.batch_size % run.dp_size:
        raise ValueError(f"trainer.batch_size {t.batch_size} (the global micro-batch) does not split over "
                         f"{run.dp_size} data-parallel ranks")
    return run
