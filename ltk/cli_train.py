"""`ltk train` and `ltk finetune`: a run config from the command line, then the Trainer in this
process, or the same command on N local processes (torchrun underneath) and on several nodes.
The parser is ltk/cli.py's; `--parallel NAME` maps onto parallel.* fields here (`set_parallel`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    from contextlib import nullcontext

    from ltk.training.base_model import adopt_base
    from ltk.training.checkpoint import load_checkpoint, read_state
    from ltk.training.config import apply_overrides
    from ltk.training.config_check import check_run
    from ltk.training.config_file import config_from_dict, load_config, to_toml
    from ltk.training.presets import get_preset
    from ltk.training.rendezvous import DIST_TIMEOUT_ENV, Rendezvous
    from ltk.training.resume import auto_resume, check_resume
    from ltk.training.run_folder import claim_run_folder
    from ltk.training.stop import TrainingStopped
    from ltk.training.trainer import Trainer

    rdzv = Rendezvous.from_args(args)  # --nproc, --nnodes ...: checked before anything starts
    launch = rdzv.launches and "WORLD_SIZE" not in os.environ
    world = rdzv.world if launch else int(os.environ.get("WORLD_SIZE", "1"))
    if args.dist_timeout is not None:
        if args.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout {args.dist_timeout}: must be > 0 seconds")
        os.environ[DIST_TIMEOUT_ENV] = str(args.dist_timeout)  # this process's ranks inherit it
    auto = args.resume == "auto"
    if auto and args.overwrite:
        raise ValueError("--resume auto continues the run in --out, --overwrite deletes it: give one")
    if args.init_from and args.resume and not auto:
        raise ValueError("--init-from starts a new run from a model's weights (fresh optimizer, step 0); "
                         "--resume continues a run exactly: give one (--resume auto may go with --init-from)")
    ckpt_path = state = init = None
    if args.init_from:  # continued pre-training: the source's model and tokenizer (ltk/training/init_from.py)
        from ltk.training.init_from import DEBUG_PRESETS, read_init_source

        init = read_init_source(args.init_from)
    if args.resume and not auto:
        if args.preset or args.config:
            raise SystemExit("ltk train: give --preset/--config or --resume, not both (a resumed run keeps its "
                             "config; --resume auto takes them)")
        ckpt_path, state = read_state(args.resume)  # the weights are read (and verified) by the trainer's process
        cfg = config_from_dict(state["config"], ckpt_path / "state.json")
        cfg.trainer.out_dir = str(ckpt_path.parent.parent)  # continue in the same run folder
    elif args.config:
        cfg = load_config(args.config, args.preset)  # the preset < the file
    else:
        cfg = get_preset(args.preset or (DEBUG_PRESETS[init.family] if init else "gpt-debug"))
    if init is not None:
        from ltk.training.init_from import adopt_init_source

        adopt_init_source(cfg, init, preset=f"--preset {args.preset}" if args.preset else None)
    if args.data is not None:
        cfg.data.source = args.data
    if args.max_steps is not None:
        cfg.trainer.max_steps = args.max_steps
    if args.out is not None:
        cfg.trainer.out_dir = args.out
    if args.device is not None:
        cfg.trainer.device = args.device
    if args.profile:
        cfg.trainer.profile = True
    if args.parallel is not None:
        set_parallel(cfg, args.parallel, world)
    apply_overrides(cfg, overrides)
    if init is not None:
        from ltk.training.init_from import check_model_overrides

        check_model_overrides(cfg, init)
    adopt_base(cfg)  # --task.kind instruct: the architecture is the base's (ltk/training/base_model.py)
    if args.print_config:
        check_run(cfg, size=False, warn=False)
        print(to_toml(cfg.to_dict()) if args.print_config == "toml" else cfg.to_json() + "\n", end="")
        return 0
    # the launching process (node 0's, on several nodes) claims the run folder (lock, no run mixed in)
    # before any work or rank starts; ranks started by torchrun directly claim it in Trainer.fit
    claims = "WORLD_SIZE" not in os.environ and (not launch or rdzv.claims_folder)
    if auto:  # the newest valid checkpoint of --out, checked against this config; none: a fresh start
        ckpt_path, state = auto_resume(cfg, deep=claims)  # every file hashed once, by the claiming process
    elif state is not None:
        check_resume(cfg, state, ckpt_path)
    if launch:
        check_run(cfg, world=world, warn=False)  # one clear error before any process starts
    folder = claim_run_folder(cfg.trainer.out_dir, resume_from=ckpt_path, overwrite=args.overwrite,
                              auto=auto) if claims else None
    with folder or nullcontext():
        if launch:
            return launch_ranks(rdzv, args.argv, folder, cfg.trainer.out_dir)
        trainer = Trainer(cfg, resume=load_checkpoint(ckpt_path) if ckpt_path else None, overwrite=args.overwrite,
                          folder=folder, auto=auto, init_from=init)
        try:
            result = trainer.fit()
        except TrainingStopped as e:
            if trainer.rt.is_main:
                print(f"\n{e}: checkpoint {e.checkpoint}\ncontinue with: ltk train --resume {trainer.run_dir}")
            return e.exit_code
        finally:
            trainer.rt.shutdown()
    m = result.metrics
    if m and trainer.rt.is_main:
        extra = f" | val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
        extra += f" | val {m['val_bpb']:.4f} bits/byte" if "val_bpb" in m else ""
        print(f"step {result.step}: loss {m['loss']:.4f}{extra}\ncheckpoint: {result.checkpoint}")
    return 0


# ours (ltk/parallel/, to learn from) | PyTorch's and DeepSpeed's production engines (to run at scale)
PARALLEL_CHOICES = ("ddp", "naive-ddp", "zero1", "zero2", "zero3", "tp", "pp",
                    "torch-ddp", "fsdp2", "torch-tp", "torch-pp",
                    "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")


def set_parallel(cfg, name: str, world: int) -> None:
    """--parallel NAME: a data-parallel engine over all ranks, or `tp` / `pp` (ours) and `torch-tp` /
    `torch-pp` (PyTorch's DTensor TP, torch.distributed.pipelining) over all ranks.
    Combinations: an engine plus --parallel.tp / --parallel.pp (dp = world / (tp · pp))."""
    from ltk.training.config import ConfigError, did_you_mean

    if name not in PARALLEL_CHOICES:
        raise ConfigError(f"--parallel {name!r} is not one of {', '.join(PARALLEL_CHOICES)}"
                          + did_you_mean(name, PARALLEL_CHOICES))
    if name in ("tp", "pp", "torch-tp", "torch-pp") and world == 1:
        raise ConfigError(f"--parallel {name} splits the model over several processes, but this run has one: "
                          "add --nproc N (or start it with torchrun)")
    if name in ("tp", "torch-tp"):
        cfg.parallel.tp = world
    elif name in ("pp", "torch-pp"):
        cfg.parallel.pp = world
        if name == "torch-pp":
            cfg.parallel.pp_engine = "torch"
    if name not in ("tp", "pp", "torch-pp"):
        cfg.parallel.strategy = name


def launch_ranks(rdzv, argv: list[str], folder, out_dir: str) -> int:
    """Re-run this command under torchrun with rdzv.nproc local processes (gloo on a CPU, NCCL on
    GPUs), alone or in a rendezvous of several nodes (ltk/training/rendezvous.py), holding the run
    folder for them: torchrun shares the lock and the ranks learn from LTK_RUN_FOLDER_HELD that it
    is taken (on nodes other than 0, `folder` is None: node 0's launcher holds it for the job).
    torchrun runs in a session of its own and gets each signal from here, once
    (ltk/training/stop.py); a failure is reported as the ranks' own one-line errors
    (ltk/training/launch.py)."""
    from ltk.training.launch import launch
    from ltk.training.rendezvous import rank_argv
    from ltk.training.run_folder import HELD_ENV

    fds = (folder.fd,) if folder is not None and folder.fd is not None else ()
    return launch(rdzv.torchrun_args(out_dir), rank_argv(argv), "train",
                  env={**rdzv.env(), HELD_ENV: str(Path(out_dir).resolve())}, pass_fds=fds)


def finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk finetune: unexpected arguments {overrides}")
    from ltk.training.finetune import FinetuneConfig, run_finetune

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be >= 1")
    if (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ:  # this process launches the ranks
        from ltk.training.launch import launch
        from ltk.training.rendezvous import rank_argv

        return launch(args.nproc, rank_argv(args.argv), "finetune")

    cfg = FinetuneConfig(method=args.method, base=args.base, data=args.data, out_dir=args.out, steps=args.steps,
                         batch_size=args.batch_size, max_len=args.max_len, lr=args.lr, lora_r=args.lora_r,
                         lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, use_rslora=args.rslora,
                         targets=args.targets, compute_dtype=args.compute_dtype, limit=args.limit,
                         eval_every=args.eval_every, eval_examples=args.eval_examples, seed=args.seed,
                         device=args.device, merge=args.merge,
                         packing=args.packing, grad_accum=args.grad_accum, dtype=args.dtype,
                         ckpt_every=args.ckpt_every, profile=args.profile, stream=args.stream,
                         stream_buffer=args.stream_buffer, chat_template=args.chat_template, parallel=args.parallel,
                         warmup_steps=args.warmup_steps)
    s = run_finetune(cfg, resume=args.resume, overwrite=args.overwrite)
    if not s:  # a rank other than 0: rank 0 reports
        return 0
    score = "exact_match" if "exact_match" in s["after"] else "val_ppl"
    print(f"{s['method']}: {s['trainable_params']:,} of {s['params']:,} parameters trained | {score} "
          f"{s['before'][score]:.4g} -> {s['after'][score]:.4g} | {s['step_ms_median']:.1f} ms/step\n"
          f"written to {cfg.out_dir}")
    return 0
