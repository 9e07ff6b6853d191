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
import sys

from ltk import cli_tools, cli_train


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
    t.add_argument("--parallel", metavar="{" + ",".join(cli_train.PARALLEL_CHOICES) + "}",
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
    t.set_defaults(func=cli_train.train)

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
    g.set_defaults(func=cli_tools.generate_command)

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
    f.set_defaults(func=cli_train.finetune)

    e = sub.add_parser("export", help="a checkpoint (sharded or not) as a Hugging Face folder",
                       description="Consolidate a run's checkpoint into a Hugging Face model folder on one "
                       "process, one tensor at a time (never the whole model in memory).")
    e.add_argument("src", metavar="RUN_OR_CKPT", help="a run folder (its newest checkpoint) or a checkpoint folder")
    e.add_argument("--hf", required=True, metavar="OUT", help="the Hugging Face folder to write")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of the exported weights")
    e.set_defaults(func=cli_tools.export_command)

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
    pl.set_defaults(func=cli_tools.plan_command)

    lab = sub.add_parser("lab", help="list or run the labs")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    lsub.add_parser("list", help="list the labs and the question each answers")
    lr = lsub.add_parser("run", help="run one lab and write its report")
    lr.add_argument("name")
    lr.add_argument("--quick", action="store_true", help="the CPU preset (minutes)")
    lr.add_argument("--out", help="output folder (default runs/<lab>/<timestamp>)")
    lab.set_defaults(func=cli_tools.lab_command)

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
    b.set_defaults(func=cli_tools.bench_command)
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
