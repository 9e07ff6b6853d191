"""The parallel checks of a run config (ltk/training/config_check.py's `check_run` calls them):
what each engine of ltk/parallel/ runs with, and whether the layout fits the world.

    engines     a setting the run's engine would not read is refused, not ignored; the
                reduce dtype against the run's dtype; PyTorch's DTensor engines (fsdp2,
                torch-tp), DeepSpeed, pipeline and tensor parallelism: what each is wired for,
                each refusal naming the nearest run that works. Context parallelism: its own
                file (ltk/training/config_check_cp.py)
    layout      world = dp x cp x tp x pp; a strategy other than auto needs several processes;
                the global batch splits over dp; the gradients of dp x cp replicas are averaged
"""
from __future__ import annotations

import os

from ltk.training.config import ConfigError, RunConfig
from ltk.training.config_check_cp import check_cp

TORCH_ENGINES = ("fsdp2", "torch-tp")  # PyTorch's DTensor engines (ltk/parallel/fsdp2.py, torch_tp.py)
BUCKETED = ("ddp", "zero1", "zero2")  # the engines that read --parallel.bucket_mb


def _check_unused(cfg: RunConfig) -> None:
    """A parallel setting that this run's engine would not read is refused, not ignored."""
    from ltk.training.config import ParallelConfig

    p, default = cfg.parallel, ParallelConfig()
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("--parallel.sequence_parallel splits the tensor-parallel group's work over the sequence: "
                          "it needs --parallel.tp > 1 (or --parallel tp / torch-tp)")
    if p.reshard_after_forward != default.reshard_after_forward and p.strategy != "fsdp2":
        raise ConfigError(f"--parallel.reshard_after_forward is FSDP2's setting; --parallel.strategy {p.strategy} "
                          "does not read it (our zero3 always frees after forward, zero2 never gathers): drop it "
                          "or use --parallel fsdp2")
    if p.bucket_mb != default.bucket_mb and (p.strategy not in BUCKETED or p.pp > 1):
        raise ConfigError(f"--parallel.bucket_mb sizes the gradient buckets of our {', '.join(BUCKETED)} engines; "
                          f"--parallel.strategy {p.strategy}{' with --parallel.pp' if p.pp > 1 else ''} does not "
                          "read it: drop it or name one of those engines")


def check_engines(cfg: RunConfig) -> None:
    """What each engine of ltk/parallel/ can run (the same at any world size)."""
    p, t = cfg.parallel, cfg.trainer
    _check_unused(cfg)
    check_cp(cfg)
    if getattr(cfg.model, "loss", "auto") == "fused" and (p.tp > 1 or p.pp > 1):
        why = ("tensor parallelism replaces with the vocab-parallel loss over its vocabulary slice" if p.tp > 1
               else "the pipeline's last stage does not call: it builds its micro-batch's logits")
        raise ConfigError(f"--model.loss fused is the LM head's (ltk/models/lm_head.py), which {why}; drop it "
                          "(--model.loss auto) or run without --parallel.tp / --parallel.pp")
    if p.reduce_dtype == "bf16" and _dtype(cfg) != "bf16":
        raise ConfigError(f"--parallel.reduce_dtype bf16 reduces bf16 gradients: it needs --trainer.dtype bf16 "
                          f"(this run's gradients are fp32: --trainer.dtype {t.dtype} on this machine)")
    if p.reduce_dtype == "fp32" and t.dtype == "fp16":
        raise ConfigError("--parallel.reduce_dtype fp32 with --trainer.dtype fp16: fp16 runs keep fp32 gradients "
                          "(autocast and a loss scaler), which are reduced in fp32 already; drop the flag")
    if p.reduce_dtype == "fp32" and _dtype(cfg) == "bf16" and p.strategy == "torch-ddp":
        raise ConfigError("--parallel.reduce_dtype fp32: PyTorch's DDP (torch-ddp) reduces gradients in their own "
                          "dtype; use --parallel.strategy ddp, naive-ddp or a ZeRO engine")
    if p.strategy in TORCH_ENGINES:
        _check_torch_engine(cfg)
    if p.pp_engine != "ltk" and p.pp == 1:
        raise ConfigError(f"--parallel.pp_engine {p.pp_engine} chooses the pipeline executor: it needs "
                          "--parallel.pp > 1 (or --parallel torch-pp)")
    if p.pp > 1:
        if cfg.family != "gpt" or p.tp > 1 or p.strategy not in ("auto", "ddp", "none", "fsdp2"):
            raise ConfigError("pipeline parallelism (--parallel.pp) runs GPT, composed with data parallelism only "
                              "(dp = world / pp: replicas, or fsdp2 with --parallel.pp_engine torch; no "
                              "--parallel.tp or ZeRO with it)")
        if t.dtype == "fp16" or t.compile:
            raise ConfigError("pipeline parallelism (--parallel.pp) runs without --trainer.dtype fp16 (its stages "
                              "have no loss scaler) and without --trainer.compile (its stages are copies of the "
                              "model's blocks built after the compile step; not wired)")
        if p.pp_engine == "torch" and t.grad_accum < p.pp:
            raise ConfigError(f"--parallel.pp_engine torch (torch.distributed.pipelining) needs at least as many "
                              f"micro-batches as stages: --trainer.grad_accum {t.grad_accum} < --parallel.pp {p.pp}; "
                              f"raise --trainer.grad_accum to {p.pp}, or use the lab's executor, which runs any m")
        if p.schedule == "interleaved" and t.grad_accum % p.pp:
            raise ConfigError(f"the interleaved schedule runs micro-batches in groups of pp: --trainer.grad_accum "
                              f"{t.grad_accum} must be a multiple of --parallel.pp {p.pp}")
        return
    if p.strategy.startswith("deepspeed-"):
        _check_deepspeed(cfg)
    if t.dtype == "fp16" and (p.strategy not in ("auto", "none", "torch-ddp") or p.tp > 1):
        raise ConfigError("--trainer.dtype fp16 needs a loss scaler, which only the plain and torch-ddp paths have: "
                          "use bf16")
    if p.tp > 1:
        if cfg.family not in ("gpt", "llama"):
            raise ConfigError(f"tensor parallelism (--parallel.tp) has plans for gpt and llama, not {cfg.family}")
        if getattr(cfg.model, "dropout", 0.0) > 0:
            raise ConfigError("tensor parallelism runs with --model.dropout 0: the ranks of a tensor-parallel group "
                              "would draw different dropout masks for the activations they share")
        if t.compile:
            raise ConfigError("--trainer.compile with tensor parallelism (--parallel.tp) is not supported: its layers "
                              "call counted collectives inside autograd functions (ltk/parallel/tensor.py), which "
                              "are not written for tracing; drop one")
        if p.strategy == "torch-ddp":
            raise ConfigError("--parallel.strategy torch-ddp does not combine with --parallel.tp: use ddp, "
                              "naive-ddp, zero1 or zero2")


def _check_torch_engine(cfg: RunConfig) -> None:
    """What PyTorch's DTensor engines are wired for here (ltk/parallel/fsdp2.py), each refusal
    naming the nearest run that works."""
    p, t, name = cfg.parallel, cfg.trainer, cfg.parallel.strategy
    if p.pp > 1 and name == "torch-tp":
        raise ConfigError("--parallel torch-tp with --parallel.pp: DTensor TP inside pipeline stages is not wired; "
                          "use --parallel tp (ours) or --parallel fsdp2 --parallel.pp N --parallel.pp_engine torch")
    if p.pp > 1 and p.tp > 1:
        raise ConfigError(f"--parallel fsdp2 with both --parallel.tp {p.tp} and --parallel.pp {p.pp}: the 3-D "
                          "mesh (FSDP2 x DTensor TP x pipelining) is not wired; drop one: fsdp2 --parallel.tp N "
                          "(2-D, FSDP2 x TP) or fsdp2 --parallel.pp N --parallel.pp_engine torch (PP x FSDP2)")
    if p.pp > 1 and p.pp_engine != "torch":
        raise ConfigError(f"--parallel fsdp2 with --parallel.pp {p.pp} runs torch.distributed.pipelining, which "
                          "drives FSDP2's gradient sync across micro-batches (the lab's executor does not): add "
                          "--parallel.pp_engine torch, or use --parallel ddp --parallel.pp N (our pipeline)")
    if t.compile:
        raise ConfigError(f"--trainer.compile with --parallel {name} is not wired (the blocks would be compiled "
                          "under fully_shard's hooks and DTensor's dispatch, untested here); drop --trainer.compile "
                          "or use --parallel zero3, which compiles block by block")
    seq = t.seq_len or getattr(cfg.model, "block_size", 0)
    if p.sequence_parallel and seq % max(p.tp, 1):
        raise ConfigError(f"--parallel.sequence_parallel splits the {seq} positions over --parallel.tp {p.tp} "
                          f"ranks: use a sequence length that is a multiple of {p.tp}")
    if (name == "torch-tp" or p.tp > 1) and cfg.family not in ("gpt", "llama"):
        raise ConfigError(f"DTensor tensor parallelism (--parallel {name}"
                          f"{' --parallel.tp' if name == 'fsdp2' else ''}) has plans for gpt and llama, not "
                          f"{cfg.family}; --parallel fsdp2 alone shards any family")
    if name == "torch-tp" and _dtype(cfg) == "bf16":
        raise ConfigError("--parallel torch-tp trains in fp32 (no fp32 master copy of DTensor parameters without "
                          "FSDP2's mixed precision); for bf16 use --parallel fsdp2 --parallel.tp N")
    if name == "torch-tp" and p.tp == 1:
        raise ConfigError("--parallel.strategy torch-tp splits layers over --parallel.tp ranks, but tp is 1: "
                          "`ltk train --parallel torch-tp --nproc N` sets tp = N; or name --parallel.tp N")


def _check_deepspeed(cfg: RunConfig) -> None:
    """DeepSpeed (ltk/parallel/deepspeed_engine.py) runs data parallelism over every rank, with our
    AdamW as its client optimizer; what it does not take here is refused before any process."""
    import importlib.util

    p, t = cfg.parallel, cfg.trainer
    if importlib.util.find_spec("deepspeed") is None:
        from ltk.parallel.deepspeed_engine import INSTALL

        raise ConfigError(f"--parallel.strategy {p.strategy} needs DeepSpeed, which is not installed: {INSTALL}; "
                          f"or run our engine of the same stage, --parallel.strategy {p.strategy[10:]}")
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(f"--parallel.strategy {p.strategy} runs over every rank (DeepSpeed's own tensor and "
                          f"pipeline parallelism are not wired here): drop --parallel.tp/--parallel.pp, or use "
                          f"--parallel.strategy {p.strategy[10:]} --parallel.tp N (ours) or fsdp2 with tp")
    if t.dtype == "fp16":
        raise ConfigError(f"--parallel.strategy {p.strategy} with --trainer.dtype fp16: DeepSpeed's fp16 loss "
                          "scaler is not wired to the loop's; use --trainer.dtype bf16 (or fp32)")
    if t.compile:
        raise ConfigError(f"--trainer.compile with --parallel.strategy {p.strategy}: DeepSpeed's hooks on every "
                          "parameter break torch.compile's graphs; drop --trainer.compile, or use our "
                          f"--parallel.strategy {p.strategy[10:]}, which compiles each block")


def _dtype(cfg: RunConfig) -> str:
    """--trainer.dtype with auto resolved for this machine (bf16 on a CUDA device that has it)."""
    if cfg.trainer.dtype != "auto":
        return cfg.trainer.dtype
    from ltk.training.runtime import resolve_device, resolve_dtype

    return resolve_dtype("auto", resolve_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", "0"))))


def check_layout(cfg: RunConfig, world: int) -> None:
    p, t = cfg.parallel, cfg.trainer
    split = p.tp * p.pp * p.cp
    if world == 1 and (p.strategy not in ("auto", "none") or split > 1):
        what = " ".join(f for f in (f"--parallel.strategy {p.strategy}" if p.strategy not in ("auto", "none") else "",
                                    f"--parallel.tp {p.tp}" if p.tp > 1 else "",
                                    f"--parallel.cp {p.cp}" if p.cp > 1 else "",
                                    f"--parallel.pp {p.pp}" if p.pp > 1 else "") if f)
        raise ConfigError(f"{what} needs several processes but this run has one: add --nproc N (or start it with "
                          f"torchrun), or train in one process with --parallel.strategy auto --parallel.tp 1 "
                          f"--parallel.pp 1")
    if world % split:
        raise ConfigError(f"--parallel.tp {p.tp} x --parallel.pp {p.pp}"
                          f"{f' x --parallel.cp {p.cp}' if p.cp > 1 else ''} = {split} does not divide the {world} "
                          f"processes (--nproc)")
    dp = world // split
    if p.strategy == "torch-tp" and dp > 1:
        raise ConfigError(f"--parallel torch-tp runs tensor parallelism over every rank, but --parallel.tp {p.tp} "
                          f"leaves {dp} data-parallel ranks: use --parallel fsdp2 --parallel.tp {p.tp} (FSDP2 over "
                          f"dp x DTensor TP), or --parallel.tp {world}")
    replicas = dp * p.cp  # the ranks that average gradients
    if p.reduce_dtype == "fp32" and _dtype(cfg) == "bf16" and p.strategy == "auto" and p.tp * p.pp == 1 < replicas:
        raise ConfigError("--parallel.reduce_dtype fp32: --parallel.strategy auto runs PyTorch's DDP here, which "
                          "reduces gradients in their own dtype; name --parallel.strategy ddp (ours) or a ZeRO engine")
    if p.strategy == "none" and replicas > 1:
        raise ConfigError(f"--parallel.strategy none with {replicas} data-parallel (dp x cp) ranks would never average "
                          "their gradients: name an engine (ddp, zero1, ...) or leave it on auto")
    if t.batch_size % dp:
        raise ConfigError(f"--trainer.batch_size {t.batch_size} (the global micro-batch) does not split over "
                          f"{dp} data-parallel ranks: use a multiple of {dp}")
