"""The lab's other commands: `ltk plan` (the cost model of a run, before it is launched),
`ltk generate`, `ltk export`, `ltk lab` and `ltk bench`, one `*_command` function each (the
suffix keeps a command's name free for its locals). The parser is ltk/cli.py's."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plan_command(args: argparse.Namespace, overrides: list[str]) -> int:
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


def generate_command(args: argparse.Namespace, overrides: list[str]) -> int:
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


def export_command(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"ltk export: unexpected arguments {overrides}")
    from ltk.training.export_hf import export_hf

    out = export_hf(args.src, args.hf, dtype=args.dtype)
    print(f"wrote {out}: transformers' from_pretrained (or ltk generate --ckpt) loads it")
    return 0


def lab_command(args: argparse.Namespace, overrides: list[str]) -> int:
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


def bench_command(args: argparse.Namespace, overrides: list[str]) -> int:
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
