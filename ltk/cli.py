"""`ltk`: the command line of the lab.

    ltk train --preset gpt-debug --max-steps 300                  # CPU, a minute or two
    ltk train --preset gpt2-124m --device cuda --trainer.compile true   # one GPU
    torchrun --standalone --nproc_per_node 8 -m ltk.cli train --preset gpt2-124m   # 8 GPUs, DDP
    ltk train --preset gpt-debug --parallel zero3 --nproc 4       # 4 CPU processes, our ZeRO-3
    ltk train --preset gpt-debug --parallel ddp --parallel.tp 2 --nproc 4   # DP 2 x TP 2
    ltk train --preset llama-debug --parallel.cp 2 --nproc 2    # each sequence split over 2 ranks (ring)
    ltk train --resume runs/gpt-debug --trainer.max_steps 600     # continue a run exactly
    ltk train --preset gpt-debug --resume auto --nproc 2 --parallel ddp --max-restarts 3   # restarts continue
    ltk train --preset gpt2-124m --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 --resume auto
                                                                  # one per node (docs/multi-node.md)
    ltk train --init-from hf/gpt2 --data corpus.txt --max-steps 500   # continued pre-training (not a resume)
    ltk train --preset gpt-debug --overwrite                      # start over in a folder that holds a run
    ltk train --config run.toml --max-steps 50                    # a config file (or a run's config.json)
    ltk train --preset gpt-debug --print-config toml > run.toml   # the resolved config, read back by --config
    ltk train --preset gpt-debug --max-steps 20 --profile         # + profile/trace.json (ui.perfetto.dev)
    ltk generate --ckpt runs/gpt-debug --prompt "def main(" --max-new-tokens 80
    ltk finetune --method lora --base runs/gpt-debug --data builtin    # LoRA on the built-in task
    ltk export runs/gpt-debug --hf hf/gpt-debug                   # a Hugging Face folder (streamed)
    ltk lab list
    ltk lab run pretrain --quick
    ltk bench list
    ltk bench train-step [--json] [--measure-peaks] [--batch-size 8]

Any config field can be overridden by its dotted path: `--trainer.batch_size 32`,
`--model.n_layer=6`, `--optim.lr 1e-3` (see ltk/training/config.py for the fields).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
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
        _set_parallel(cfg, args.parallel, world)
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
            return _launch(rdzv, args.argv, folder, cfg.trainer.out_dir)
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


def _set_parallel(cfg, name: str, world: int) -> None:
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


def _launch(rdzv, argv: list[str], folder, out_dir: str) -> int:
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


def _finetune(args: argparse.Namespace, overrides: list[str]) -> int:
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


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk plan: unexpected arguments {overrides}")
    from ltk.models.gpt import GPT_SIZES, gpt_config
    from ltk.models.llama import LLAMA_SIZES, llama_config
    from ltk.parallel.plan import format_plan, plan
    from ltk.parallel.plan_finetune import format_finetune_plan

    name = args.preset
    if name in GPT_SIZES:
        family, cfg = "gpt", gpt_config(name)
    elif name in LLAMA_SIZES:
        family, cfg = "llama", llama_config(name)
    else:
        raise ValueError(f"unknown model {name!r} for ltk plan; known: {', '.join([*GPT_SIZES, *LLAMA_SIZES])}")
    if cfg.vocab_size == 0:  # the debug sizes take it from the data: plan with the default tokenizer's
        cfg.vocab_size = 2048
    seq = args.seq_len if args.seq_len is not None else min(cfg.block_size, 8192)
    p = plan(family, cfg, world=args.world, strategy=args.strategy, tp=args.tp, pp=args.pp, batch=args.batch_size,
             seq_len=seq, micro_batches=args.micro_batches, dtype=args.dtype, schedule=args.schedule,
             virtual=args.virtual_stages, sequence_parallel=args.sequence_parallel, recompute=args.recompute,
             cluster=args.cluster, efficiency=args.efficiency,
             reduce_dtype=None if args.reduce_dtype == "auto" else args.reduce_dtype,
             cp=args.cp, cp_impl=args.cp_impl, method=args.method, lora_r=args.lora_r,
             lora_targets=args.lora_targets, compute_dtype=args.compute_dtype,
             reshard_after_forward=args.reshard_after_forward == "true")
    p["preset"], p["seq_len"], p["batch"] = name, seq, args.batch_size
    text = format_finetune_plan(p) if args.method else format_plan(p)
    print(json.dumps(p, indent=2) if args.json else text)
    return 0


def _generate(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk generate: unexpected arguments {overrides}")
    import torch

    from ltk.models import Llama, from_pretrained, get_family
    from ltk.models.generate import check_sampling, generate
    from ltk.models.hf.folder import is_hf_folder
    from ltk.training.checkpoint import load_checkpoint, restore_model
    from ltk.training.config_check import check_weights
    from ltk.training.config_file import config_from_dict
    from ltk.training.runtime import resolve_device
    from ltk.training.tokenizer import Tokenizer

    try:  # argv bytes that are not UTF-8 arrive as lone surrogates (U+DC80..U+DCFF)
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(e.object[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise ValueError(f"--prompt is not valid UTF-8 text ({what} at character {e.start})") from None
    check_sampling(args.max_new_tokens or 0, args.temperature, args.top_k)  # before a model loads
    device = resolve_device(args.device)
    if is_hf_folder(args.ckpt):  # a Hugging Face folder: weights + tokenizer.json
        model = from_pretrained(args.ckpt)
        if not isinstance(model, (get_family("gpt").model_cls, Llama)):
            raise SystemExit(f"ltk generate: {type(model).__name__} is not a decoder-only model")
        block_size, tok_dir = model.config.block_size, Path(args.ckpt)
    else:  # a run folder or one of its checkpoints
        ckpt = load_checkpoint(args.ckpt)
        cfg = config_from_dict(ckpt.state["config"], ckpt.path / "state.json")
        if cfg.family not in ("gpt", "llama"):
            raise SystemExit(f"ltk generate: {cfg.family} is not a decoder-only model; "
                             "generate works with gpt and llama checkpoints")
        check_weights(cfg, ckpt.path / "state.json")  # absurd sizes refused before the model is built
        model = get_family(cfg.family).model_cls(cfg.model)
        restore_model(model, ckpt.model)
        block_size, tok_dir = cfg.model.block_size, ckpt.path
    model.to(device)
    if not (tok_dir / "tokenizer.json").exists():
        raise SystemExit(f"ltk generate: {tok_dir} has no tokenizer.json")
    tok = Tokenizer.load(tok_dir)
    new_tokens = min(100, block_size) if args.max_new_tokens is None else args.max_new_tokens
    check_sampling(new_tokens, args.temperature, args.top_k, context=block_size)
    ids = tok.encode(args.prompt)
    if not ids:  # every training document follows an end-of-text token: start a new document
        print("ltk generate: note: the prompt is empty; sampling from the end-of-text token", file=sys.stderr)
        ids = [tok.eot_id]
    elif len(ids) > block_size:
        print(f"ltk generate: warning: the prompt is {len(ids)} tokens; the model sees only the last {block_size}",
              file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, new_tokens, block_size=block_size, temperature=args.temperature,
                   top_k=args.top_k or None, stop_token=tok.eot_id, generator=gen)
    new = [i for i in out[0, len(ids):].tolist() if i != tok.eot_id]
    print(args.prompt + tok.decode(new))
    return 0


def _export(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk export: unexpected arguments {overrides}")
    from ltk.training.export_hf import export_hf

    out = export_hf(args.src, args.hf, dtype=args.dtype)
    print(f"wrote {out}: transformers' from_pretrained (or ltk generate --ckpt) loads it")
    return 0


def _lab(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk lab: unexpected arguments {overrides}")
    from ltk.labs.registry import list_labs, run_lab

    if args.lab_cmd == "list":
        for lab in list_labs():
            print(f"{lab.name:12s} {lab.question}  (quick: {lab.quick_duration} on a 2-core CPU)")
        return 0
    report = run_lab(args.name, args.out, quick=args.quick)
    print(f"wrote {report}")
    return 0


def _bench(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk bench: unexpected arguments {overrides}")
    from ltk.bench import BENCHMARKS, get_benchmark, run_benchmark
    from ltk.bench.harness import rows_to_json, rows_to_markdown, write_csv
    from ltk.bench.peaks import measure_peaks
    from ltk.training.writable import writable_dir, writable_file

    if args.bench_cmd == "list":
        for name, b in BENCHMARKS.items():
            print(f"{name:14s} {b.description}")
        return 0
    bench = get_benchmark(args.bench_cmd)
    opts = bench.kwargs_from(args)
    if args.csv:  # before the benchmark runs, not after
        writable_file(args.csv, "--csv")
    if args.save_results:
        writable_dir(args.save_results, "--save-results")
    if args.measure_peaks:
        peaks = measure_peaks(opts.get("device", "auto"))
        # with --json, stdout holds only the rows; the peaks go to stderr
        print(json.dumps(peaks, indent=2), file=sys.stderr if args.json else sys.stdout)
    rows = run_benchmark(args.bench_cmd, **opts)
    if args.csv:
        write_csv(rows, args.csv)
    if args.save_results:
        from ltk.bench.results import write_result

        path = write_result(args.save_results, args.bench_cmd, rows, bench.run, opts.get("device", "auto"))
        print(f"wrote {path}", file=sys.stderr)
    print(rows_to_json(rows) if args.json else rows_to_markdown(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltk", description="A kernel and systems lab for training LLMs.",
                                epilog="Run `ltk COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", allow_abbrev=False, help="train a model from a preset (or resume a run)",
                       description="Train a model. Extra --section.field VALUE pairs override any config field.",
                       epilog="example: ltk train --preset gpt-debug --max-steps 200 --optim.lr 1e-3")
    t.add_argument("--preset", help="gpt-debug (default), llama-debug, bert-debug, t5-debug, "
                   "gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1.5b")
    t.add_argument("--config", metavar="FILE", help="a .toml or .json run config (a run's config.json, or any "
                   "subset of the fields) over the preset; flags and --section.field overrides win over it")
    t.add_argument("--data", help="text file or folder, .jsonl or .parquet (default: the embedded corpus)")
    t.add_argument("--max-steps", type=int, help="optimizer steps (trainer.max_steps)")
    t.add_argument("--out", help="run folder (trainer.out_dir)")
    t.add_argument("--resume", help="a run folder or checkpoint folder to continue from; `auto`: the newest valid "
                   "checkpoint of --out if there is one (with --preset/--config/flags, which must match it), "
                   "else a fresh start: what restarts and requeues run")
    t.add_argument("--init-from", metavar="HF_FOLDER_OR_RUN",
                   help="continued pre-training: start from the weights, model config and tokenizer of a "
                   "Hugging Face folder (GPT-2, Llama, BERT, T5) or one of our run folders / checkpoints, the "
                   "data tokenized with that tokenizer; NOT a resume: the optimizer, step, schedule and data "
                   "start fresh (refused with --resume PATH; with --resume auto a restart continues this run)")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: delete its config, metrics and checkpoints "
                   "(once no other run holds the folder)")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto (trainer.device)")
    t.add_argument("--parallel", metavar="{" + ",".join(PARALLEL_CHOICES) + "}",
                   help="parallel strategy: one of ours (ltk/parallel/, written to learn from) or a production "
                   "engine (torch-ddp, fsdp2, torch-tp, torch-pp, deepspeed-zero1/2/3); a data-parallel engine, or "
                   "tp / pp / torch-tp / torch-pp over all ranks; combine with --parallel.tp N / --parallel.pp N "
                   "(PP x FSDP2: --parallel fsdp2 --parallel.pp N --parallel.pp_engine torch)")
    t.add_argument("--profile", action="store_true",
                   help="trace a few steps with torch.profiler and sample GPU counters (trainer.profile): "
                   "writes profile/ in the run folder")
    t.add_argument("--nproc", type=int, help="start N local processes (torchrun underneath); per node with --nnodes")
    t.add_argument("--nnodes", type=int, default=1, help="nodes in the run: run the same command on each "
                   "with its --node-rank and the same --master-addr or --rdzv-endpoint (docs/multi-node.md)")
    t.add_argument("--node-rank", type=int, help="this node's rank, 0..nnodes-1 (node 0 claims the run folder)")
    t.add_argument("--master-addr", metavar="HOST", help="static rendezvous: the host of node 0")
    t.add_argument("--master-port", type=int, metavar="PORT", help="static rendezvous: its port (default 29500)")
    t.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="c10d rendezvous (restarts across nodes): where the nodes meet")
    t.add_argument("--rdzv-id", help="c10d rendezvous: the job's id (default: from --out)")
    t.add_argument("--max-restarts", type=int, default=0, help="restart the ranks up to K times when one fails "
                   "(torchrun's); needs --resume auto, which continues from the newest checkpoint")
    t.add_argument("--dist-timeout", type=float, metavar="SECONDS", help="collective timeout of the process group "
                   "(default: torch's, 30 min on gloo, 10 min on NCCL): a hung rank fails the group after it")
    t.add_argument("--print-config", nargs="?", const="json", choices=("json", "toml"),
                   help="print the resolved config (JSON, or TOML) and exit; --config reads it back")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--ckpt", required=True,
                   help="a run folder, one of its checkpoints, or a Hugging Face folder (GPT-2 or Llama)")
    g.add_argument("--prompt", required=True, help="UTF-8 text; empty = sample a new document")
    g.add_argument("--max-new-tokens", type=int,
                   help="at most the model's context (block_size); default 100, or the context if shorter")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_generate)

    f = sub.add_parser("finetune", help="fine-tune a pretrained model: full, LoRA or QLoRA",
                       description="Fine-tune one of our checkpoints or a Hugging Face folder on instruction data.")
    f.add_argument("--method", default="lora", choices=("full", "lora", "qlora"))
    f.add_argument("--base", required=True, help="a run folder / checkpoint of ours, or a Hugging Face folder")
    f.add_argument("--data", default="builtin", help="builtin (an exactly scored task; builtin:last,lookup for some "
                   "of its kinds) or a .jsonl (Alpaca or chat rows)")
    f.add_argument("--stream", action="store_true", help="read the .jsonl row by row (a shuffle buffer, O(buffer) "
                   "memory, an exactly resumable position) instead of loading it whole; val rows by a hash of "
                   "their prompt (--task.stream)")
    f.add_argument("--stream-buffer", type=int, default=1024, help="rows in the shuffle buffer of --stream")
    f.add_argument("--chat-template", metavar="FOLDER|base",
                   help="render the rows with a tokenizer's chat_template (Jinja, from a Hugging Face folder's "
                   "tokenizer_config.json; base: the --base folder's), the loss on every assistant turn "
                   "(--task.chat_template)")
    f.add_argument("--out", default="runs/finetune", help="output folder")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--max-len", type=int, default=128, help="tokens per example (per row with --packing)")
    f.add_argument("--packing", action="store_true",
                   help="pack each step's examples several to a row (same loss, fewer padded slots)")
    f.add_argument("--lr", type=float, default=0.0, help="0 = 3e-4 (full) or 3e-3 (lora, qlora)")
    f.add_argument("--warmup-steps", type=int, default=20, help="linear warmup, then cosine to 0.1·lr")
    f.add_argument("--lora-r", type=int, default=8)
    f.add_argument("--lora-alpha", type=float, default=16.0)
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(r) (rsLoRA)")
    f.add_argument("--targets", default="", help="comma list of layer-name patterns (default: every block projection)")
    f.add_argument("--compute-dtype", default="fp32", choices=("fp32", "bf16"), help="QLoRA's matmul dtype")
    f.add_argument("--limit", type=int, help="use at most this many examples")
    f.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (0 = only after the last)")
    f.add_argument("--eval-examples", type=int, default=64, help="examples scored by exact match at each evaluation")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto")
    f.add_argument("--merge", action="store_true", help="also write merged/: full weights with the adapter folded in")
    # from the training loop (ltk/training/trainer.py), which fine-tuning runs through
    f.add_argument("--grad-accum", type=int, default=1, help="batches of --batch-size examples per optimizer step")
    f.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="bf16: bf16 weights with an fp32 master in the optimizer (auto: bf16 on CUDA)")
    f.add_argument("--ckpt-every", type=int, default=0, help="a checkpoint every N steps (0 = after the last only)")
    f.add_argument("--resume", metavar="RUN_OR_CKPT|auto",
                   help="continue a fine-tuning run exactly from its checkpoint (auto: --out's newest, if any)")
    f.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    f.add_argument("--profile", action="store_true", help="torch.profiler trace of a few steps -> OUT/profile/")
    f.add_argument("--parallel", "--parallel.strategy", dest="parallel", default="auto",
                   choices=("auto", "ddp", "naive-ddp", "torch-ddp", "zero3", "fsdp2"),
                   help="the data-parallel engine over --nproc ranks: ddp replicates the base; zero3 / fsdp2 shard "
                   "the frozen base (and QLoRA's NF4 storage) over the ranks; only the adapters' gradients are reduced")
    f.add_argument("--nproc", type=int, help="start N local processes (torchrun: gloo on a CPU, NCCL on GPUs)")
    f.set_defaults(func=_finetune)

    e = sub.add_parser("export", help="a checkpoint (sharded or not) as a Hugging Face folder",
                       description="Consolidate a run's checkpoint into a Hugging Face model folder on one "
                       "process, one tensor at a time (never the whole model in memory).")
    e.add_argument("src", metavar="RUN_OR_CKPT", help="a run folder (its newest checkpoint) or a checkpoint folder")
    e.add_argument("--hf", required=True, metavar="OUT", help="the Hugging Face folder to write")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of the exported weights")
    e.set_defaults(func=_export)

    pl = sub.add_parser("plan", help="memory per rank and bytes per step of a parallel run (cost model)",
                        description="Predict memory per rank (parameters, gradients, optimizer states, "
                        "activations) and communication per step from ltk/parallel/cost.py.")
    pl.add_argument("--preset", required=True,
                    help="gpt-debug, gpt2-124m ... gpt2-1.5b, llama-debug, llama-1b, llama-8b")
    # each flag also answers to the name `ltk train` gives it (--trainer.dtype, --parallel.tp, ...)
    pl.add_argument("--world", "--nproc", type=int, required=True, help="number of ranks")
    pl.add_argument("--strategy", "--parallel.strategy", dest="strategy", default="ddp",
                    help="none, ddp, zero1, zero2, zero3, fsdp2 (the data-parallel engine)")
    pl.add_argument("--tp", "--parallel.tp", dest="tp", type=int, default=1, help="tensor-parallel degree")
    pl.add_argument("--pp", "--parallel.pp", dest="pp", type=int, default=1, help="pipeline stages")
    pl.add_argument("--cp", "--parallel.cp", dest="cp", type=int, default=1,
                    help="context-parallel degree: ranks each sequence is split over (mesh pp x dp x cp x tp)")
    pl.add_argument("--cp-impl", "--parallel.cp_impl", dest="cp_impl", default="ring", choices=("ring", "ulysses"),
                    help="ring attention (zig-zag split) or Ulysses all-to-all (heads split)")
    pl.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step)")
    pl.add_argument("--seq-len", "--trainer.seq_len", dest="seq_len", type=int,
                    help="tokens per sequence (default: the model's, at most 8192)")
    pl.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step (accumulation / pipeline)")
    pl.add_argument("--dtype", "--trainer.dtype", dest="dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    pl.add_argument("--reduce-dtype", "--parallel.reduce_dtype", dest="reduce_dtype", default="auto",
                    choices=("auto", "fp32", "bf16"), help="dtype of the gradient reduction (auto: the gradients')")
    pl.add_argument("--schedule", "--parallel.schedule", dest="schedule", default="1f1b",
                    choices=("gpipe", "1f1b", "interleaved"))
    pl.add_argument("--virtual-stages", "--parallel.virtual_stages", dest="virtual_stages", type=int, default=1)
    pl.add_argument("--sequence-parallel", "--parallel.sequence_parallel", dest="sequence_parallel",
                    action="store_true")
    pl.add_argument("--recompute", action="store_true", help="full activation recomputation")
    pl.add_argument("--reshard-after-forward", "--parallel.reshard_after_forward", dest="reshard_after_forward",
                    default="true", choices=("true", "false"),
                    help="fsdp2: free each gathered block after its forward (true, ZeRO-3) or keep it to the backward")
    pl.add_argument("--cluster", help="predict step time, MFU and tokens/s on a cluster: dgx-a100, dgx-h100, "
                    "h200-node, cpu-gloo or a .json description (ltk/parallel/cluster.py)")
    pl.add_argument("--efficiency", type=float, help="with --cluster: fraction of peak FLOP/s the kernels reach "
                    "(default 0.5, not measured)")
    # fine-tuning (ltk/parallel/plan_finetune.py): each flag as `ltk finetune` names it
    pl.add_argument("--method", choices=("full", "lora", "qlora"),
                    help="plan a fine-tuning run: what trains, the frozen (NF4 for qlora) base, the adapters; "
                    "with --strategy none, ddp, zero3 or fsdp2")
    pl.add_argument("--lora-r", type=int, default=8, help="with --method lora/qlora: the adapters' rank")
    pl.add_argument("--lora-targets", "--targets", dest="lora_targets", default="",
                    help="with --method lora/qlora: comma list of layer-name patterns (default: every projection)")
    pl.add_argument("--compute-dtype", default="fp32", choices=("fp32", "bf16"),
                    help="with --method qlora: the 4-bit layers' matmul dtype (A and B are kept in it)")
    pl.add_argument("--json", action="store_true", help="print a JSON object")
    pl.set_defaults(func=_plan)

    lab = sub.add_parser("lab", help="list or run the labs")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    lsub.add_parser("list", help="list the labs and the question each answers")
    lr = lsub.add_parser("run", help="run one lab and write its report")
    lr.add_argument("name")
    lr.add_argument("--quick", action="store_true", help="the CPU preset (minutes)")
    lr.add_argument("--out", help="output folder (default runs/<lab>/<timestamp>)")
    lab.set_defaults(func=_lab)

    b = sub.add_parser("bench", help="run a benchmark (`ltk bench list` shows them)")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bsub.add_parser("list", help="list the benchmarks")
    from ltk.bench import BENCHMARKS

    for name, bench in BENCHMARKS.items():
        bp = bsub.add_parser(name, help=bench.description, description=bench.description, allow_abbrev=False)
        bench.add_arguments(bp)
        bp.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
        bp.add_argument("--csv", help="append the rows to this long-format CSV")
        bp.add_argument("--save-results", metavar="DIR",
                        help="write DIR/<benchmark>_<device>_<date>.md: method, command, machine, rows")
        bp.add_argument("--measure-peaks", action="store_true",
                        help="also measure copy bandwidth and matmul rate on the device")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from ltk.training.launch import report_error  # one line; a rank's goes to its launcher

    try:
        return args.func(args, extra)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError and bad input
        report_error(args.cmd, str(e))
        return 2
    except RuntimeError as e:
        if type(e).__name__ == "CheckpointError":
            report_error(args.cmd, str(e))
            return 2
        raise
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop, or a second one inside it
        print(f"ltk {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
