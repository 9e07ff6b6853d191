"""Benchmarks: a registry of named benchmarks that each return rows of the results CSV.

    from ltk.bench import run_benchmark, rows_to_markdown
    print(rows_to_markdown(run_benchmark("train-step", batch_size=4)))

Each `Benchmark` declares its options (name, type, default, help), so a command line can
offer them without knowing any benchmark:

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="name")
    for b in BENCHMARKS.values():
        b.add_arguments(sub.add_parser(b.name, help=b.description))
    args = parser.parse_args()
    rows = run_benchmark(args.name, **BENCHMARKS[args.name].kwargs_from(args))

The kernel benchmarks (attention, layernorm, rmsnorm, swiglu, rope; ltk/bench/sweep.py) return their rows as
a list that also carries `.skipped`: each provider that could not run at a point, and why.

Only the options given on the command line reach `run`, so the defaults live in one place
(the `run` function's signature; `Option.default` repeats them for --help, and a test keeps
the two equal). The timing method, the CSV schema and the peaks are in ltk/bench/harness.py and
ltk/bench/peaks.py; the pytest-benchmark suites (`pytest ltk/bench/`) time the same steps.

The registry is data: each benchmark names its `run` as "module:function", imported when it
runs, so `ltk --help` and `ltk bench NAME --help` import no benchmark and no torch (the
benchmark modules import torch, Triton and their baselines: seconds of start-up; `ltk bench
cli-startup` measures it). The provider names in the help texts are written out here for the
same reason; a test keeps them equal to each module's PROVIDERS. The names re-exported below
(Row, time_fn, ...) load on first use.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ltk.bench.harness import Row

# the providers each sweep knows, for --help (equal to the module's PROVIDERS; a test checks)
ATTENTION_PROVIDERS = ("ours", "torch", "sdpa", "torch.compile", "flash-attn")
NORM_PROVIDERS = ("ours", "torch", "unfused", "torch.compile", "liger")
NF4_PROVIDERS = ("ours", "ours-reference", "bitsandbytes", "dense", "torch.compile")
LORA_PROVIDERS = ("ours", "ours-reference", "peft", "torch.compile")
CROSS_ENTROPY_PROVIDERS = ("fused", "torch", "torch.compile", "liger")
SWIGLU_PROVIDERS = ("ours", "ours-saved", "torch", "torch.compile", "liger")
ROPE_PROVIDERS = ("ours", "ours-inplace", "torch", "torch.compile", "liger")


@dataclass(frozen=True)
class Option:
    """One keyword argument of a benchmark's `run`; on a command line `--name-with-dashes`."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str  # one line, shown by `ltk bench --help`
    target: str  # "module:function" of the run function, imported on first use
    options: tuple[Option, ...] = ()

    @property
    def run(self) -> Callable[..., list[Row]]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per option; unset flags stay None and are left out by `kwargs_from`."""
        for o in self.options:
            if o.type is bool:  # a switch: present means True
                parser.add_argument(o.flag, dest=o.name, action="store_true", default=None,
                                    help=f"{o.help} (default: off)")
                continue
            parser.add_argument(o.flag, dest=o.name, type=o.type, default=None, choices=o.choices,
                                help=f"{o.help} (default: {o.default})")

    def kwargs_from(self, namespace: argparse.Namespace) -> dict:
        """The options set on the command line, as keyword arguments for `run`."""
        return {o.name: getattr(namespace, o.name) for o in self.options
                if getattr(namespace, o.name, None) is not None}

    def parse_args(self, argv: list[str]) -> dict:
        """Parse this benchmark's flags alone, e.g. ["--batch-size", "4"] -> {"batch_size": 4}."""
        parser = argparse.ArgumentParser(prog=f"ltk bench {self.name}", description=self.description)
        self.add_arguments(parser)
        return self.kwargs_from(parser.parse_args(argv))


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "train-step",
            "tokens/s of a full training step (fwd, loss, bwd, AdamW): our GPT vs transformers' GPT-2",
            "ltk.bench.train_step:run",
            (
                Option("model", str, "gpt", "family: gpt (sized by --preset), or llama, bert, t5 (debug sizes)",
                       ("gpt", "llama", "bert", "t5")),
                Option("preset", str, "gpt-debug", "model size preset from models.gpt.GPT_SIZES"),
                Option("vocab_size", int, None, "vocabulary (default: the preset's, or 2048 for gpt-debug)"),
                Option("batch_size", int, 8, "sequences per step"),
                Option("seq_len", int, None, "tokens per sequence (default: the preset's block_size)"),
                Option("dtype", str, "auto", "auto = fp32 on CPU, bf16 autocast on CUDA",
                       ("auto", "fp32", "bf16")),
                Option("rounds", int, 4, "rounds over the providers, in alternating order (ABBA)"),
                Option("seed", int, 1337, "seed of the weights and the token batches"),
                Option("min_time", float, 8.0, "timed seconds per provider, split over the rounds"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("providers", str, None, "comma list of ours, ours-compile, transformers, or all "
                       "(default: ours,transformers); for --model llama/bert also transformers+ours "
                       "(ltk.patch) and, for llama, transformers+liger"),
                Option("compile_backend", str, "inductor", "torch.compile backend of ours-compile"),
            ),
        ),
        Benchmark(
            "attention",
            "attention TFLOP/s over sequence lengths: ours (Triton) vs eager, SDPA, torch.compile, flash-attn",
            "ltk.bench.attention:run",
            (
                Option("seq_lens", str, None, "comma list of sequence lengths, e.g. 512,1k,2k "
                       "(default: 512 … 16k on CUDA, 128 … 1024 on a CPU)"),
                Option("batch", int, None, "fixed batch size (default: tokens // T, so B·T stays constant)"),
                Option("tokens", int, None, "B·T when --batch is not given (default: 16384 on CUDA, 2048 on a CPU)"),
                Option("heads", int, None, "attention heads H (default: 16 on CUDA, 8 on a CPU)"),
                Option("head_dim", int, None, "head dimension D (default: 128 on CUDA, 64 on a CPU)"),
                Option("causal", str, "auto", "causal mask: both, yes, no; auto = both", ("auto", "both", "yes", "no")),
                Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU", ("auto", "fp32", "fp16", "bf16")),
                Option("modes", str, None, "comma list of fwd, bwd, fwd+bwd, or all "
                       "(default: all on CUDA, fwd,fwd+bwd on a CPU)"),
                Option("providers", str, "all", "comma list of " + ", ".join(ATTENTION_PROVIDERS) + ", or all"),
                Option("min_time", float, 0.25, "timed seconds per point"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("seed", int, 0, "seed of the random inputs"),
                Option("plot", str, None, "write a PNG of TFLOP/s against T, one panel per mode, to this path"),
            ),
        ),
        *[
            Benchmark(
                op,
                f"{label} GB/s over hidden sizes, against the measured copy bandwidth: ours (Triton) vs "
                "torch, unfused eager, torch.compile, Liger",
                target,
                (
                    Option("hidden_sizes", str, None, "comma list of hidden sizes N, e.g. 1k,4k "
                           "(default: 1k … 16k on CUDA, 256,1k,4k on a CPU)"),
                    Option("rows", int, None, "rows of x, e.g. batch × tokens (default: 4096 on CUDA, 1024 on a CPU)"),
                    Option("residual", bool, False, "time the fused residual variant: h = x + r, y = Norm(h)"),
                    Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU",
                           ("auto", "fp32", "fp16", "bf16")),
                    Option("modes", str, "all", "comma list of fwd, bwd, fwd+bwd, or all"),
                    Option("providers", str, "all", "comma list of " + ", ".join(NORM_PROVIDERS) + ", or all"),
                    Option("min_time", float, 0.25, "timed seconds per point"),
                    Option("copy_mib", int, None, "MiB copied to measure the bandwidth "
                           "(default: 2048 on CUDA, 256 on a CPU)"),
                    Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                    Option("seed", int, 0, "seed of the random inputs"),
                    Option("plot", str, None, "write a PNG of GB/s against N, one panel per mode, to this path"),
                ),
            )
            for op, label, target in (("layernorm", "LayerNorm", "ltk.bench.norms:run_layernorm"),
                                      ("rmsnorm", "RMSNorm", "ltk.bench.norms:run_rmsnorm"))
        ],
        Benchmark(
            "swiglu",
            "SwiGLU / GeGLU y = act(g)·u GB/s over hidden widths, against the measured copy bandwidth: ours "
            "(Triton, recomputing or saving act(g)) vs eager torch, torch.compile, Liger",
            "ltk.bench.swiglu:run",
            (
                Option("activation", str, "silu", "silu (SwiGLU), gelu_tanh (T5 1.1's GeGLU), gelu (erf GeGLU)",
                       ("silu", "gelu_tanh", "gelu")),
                Option("ffn_sizes", str, None, "comma list of widths F, e.g. 11008,14336 "
                       "(default: 4k … 28k on CUDA, 1001,4096 on a CPU)"),
                Option("rows", int, None, "rows (tokens) of g and u (default: 4096 on CUDA, 256 on a CPU)"),
                Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU", ("auto", "fp32", "fp16", "bf16")),
                Option("modes", str, "all", "comma list of fwd, bwd, fwd+bwd, or all"),
                Option("providers", str, "all", "comma list of " + ", ".join(SWIGLU_PROVIDERS) + ", or all"),
                Option("min_time", float, 0.25, "timed seconds per point"),
                Option("copy_mib", int, None, "MiB copied to measure the bandwidth "
                       "(default: 2048 on CUDA, 256 on a CPU)"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("seed", int, 0, "seed of the random inputs"),
                Option("plot", str, None, "write a PNG of GB/s against F, one panel per mode, to this path"),
            ),
        ),
        Benchmark(
            "rope",
            "RoPE on q and k (GQA, the models' strided layout) GB/s over sequence lengths, against the measured "
            "copy bandwidth: ours (Triton, out of place and in place) vs eager torch, torch.compile, Liger",
            "ltk.bench.rope:run",
            (
                Option("seq_lens", str, None, "comma list of sequence lengths T, e.g. 1k,4k "
                       "(default: 1k … 8k on CUDA, 128,512 on a CPU)"),
                Option("batch", int, None, "sequences B (default: 4 on CUDA, 1 on a CPU)"),
                Option("heads", int, None, "query heads Hq (default: 32 on CUDA, 4 on a CPU)"),
                Option("kv_heads", int, None, "key/value heads Hkv, dividing Hq (default: 8 on CUDA, 2 on a CPU)"),
                Option("head_dim", int, None, "head dim D, even (default: 128 on CUDA, 64 on a CPU)"),
                Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU", ("auto", "fp32", "fp16", "bf16")),
                Option("modes", str, "all", "comma list of fwd, bwd, fwd+bwd, or all"),
                Option("providers", str, "all", "comma list of " + ", ".join(ROPE_PROVIDERS) + ", or all"),
                Option("min_time", float, 0.25, "timed seconds per point"),
                Option("copy_mib", int, None, "MiB copied to measure the bandwidth "
                       "(default: 2048 on CUDA, 256 on a CPU)"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("seed", int, 0, "seed of the random inputs"),
                Option("plot", str, None, "write a PNG of GB/s against T, one panel per mode, to this path"),
            ),
        ),
        Benchmark(
            "nf4",
            "y = x·Wᵀ with W in NF4 (QLoRA's frozen base), TFLOP/s and GB/s over M×N×K: ours (fused Triton "
            "dequant-matmul) vs bitsandbytes' matmul_4bit, the dequantize+F.linear path, dense, torch.compile",
            "ltk.bench.nf4:run",
            (
                Option("shapes", str, None, "comma list of M×N×K, e.g. 4096x4096x4096,4096x11008x4096 "
                       "(default: 4096 × 4096², 11008×4096, 4096×11008 on CUDA; 256x1024x1024 on a CPU)"),
                Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU", ("auto", "fp32", "fp16", "bf16")),
                Option("modes", str, "all", "comma list of fwd, bwd (dx only: W is frozen), fwd+bwd, or all"),
                Option("providers", str, "all", "comma list of " + ", ".join(NF4_PROVIDERS) + ", or all"),
                Option("min_time", float, 0.25, "timed seconds per point"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("seed", int, 0, "seed of x and W"),
            ),
        ),
        Benchmark(
            "lora",
            "LoRA linear y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ forward and backward (dx, dA, dB; W frozen): ours (fused Triton) "
            "vs PEFT, the unfused reference, torch.compile",
            "ltk.bench.lora:run",
            (
                Option("shapes", str, None, "comma list of M×N×K, e.g. 4096x4096x4096 "
                       "(default: 4096x4096x4096 on CUDA, 256x512x512 on a CPU)"),
                Option("rank", int, 16, "LoRA rank r"),
                Option("alpha", float, 32.0, "LoRA alpha; the scale is alpha / r"),
                Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU", ("auto", "fp32", "fp16", "bf16")),
                Option("modes", str, "all", "comma list of fwd, bwd, fwd+bwd, or all"),
                Option("providers", str, "all", "comma list of " + ", ".join(LORA_PROVIDERS) + ", or all"),
                Option("min_time", float, 0.25, "timed seconds per point"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("seed", int, 0, "seed of the random inputs"),
            ),
        ),
        Benchmark(
            "cross-entropy",
            "the loss step (fwd+bwd of CE(h·Wᵀ, y)), time and peak memory over V and N: our fused linear "
            "cross-entropy vs F.cross_entropy on the full logits, torch.compile, Liger",
            "ltk.bench.cross_entropy:run",
            (
                Option("vocab_sizes", str, None, "comma list of V (default: 8192,32768 on a CPU; "
                       "32000,50257,128256 on CUDA)"),
                Option("tokens", str, None, "comma list of N = B·T (default: 1k,4k on a CPU; 4k,8k on CUDA)"),
                Option("hidden", int, None, "d, the hidden size (default: 256 on a CPU, 2048 on CUDA)"),
                Option("dtype", str, "auto", "auto = bf16 on CUDA, fp32 on a CPU", ("auto", "fp32", "fp16", "bf16")),
                Option("providers", str, "all", "comma list of " + ", ".join(CROSS_ENTROPY_PROVIDERS) + ", or all"),
                Option("min_time", float, None, "timed seconds per point (default: 0.25; 0 = one step)"),
                Option("device", str, "auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
                Option("seed", int, 0, "seed of h, W and the targets"),
                Option("preset", str, None, "llama3-8k: N 8192, d 2048, V 128256, one timed step (the memory "
                       "check)", ("llama3-8k",)),
            ),
        ),
        Benchmark(
            "qlora-memory",
            "memory of QLoRA on a Llama-2-7B shape by component (NF4 weights, adapters, AdamW, matmul "
            "transients): ours vs bitsandbytes + PEFT; runs on a CPU",
            "ltk.bench.qlora_memory:run",
            (
                Option("n_embd", int, 4096, "model width d (Llama-2-7B: 4096)"),
                Option("n_layer", int, 32, "transformer blocks"),
                Option("n_head", int, 32, "attention heads (no GQA: key/value heads = heads)"),
                Option("intermediate_size", int, 11008, "SwiGLU hidden width"),
                Option("vocab_size", int, 32000, "vocabulary (embedding and head rows)"),
                Option("rank", int, 16, "LoRA rank r on all 7 projections of every block"),
                Option("adapter_dtype", str, "bf16", "dtype of the adapters, gradients and AdamW states, both sides "
                       "(PEFT's default is fp32)", ("bf16", "fp32")),
                Option("checkpointing", str, "both", "activation checkpointing: both, yes, no",
                       ("both", "yes", "no")),
                Option("batch", int, 1, "sequences, for the checkpointed block inputs (shown apart)"),
                Option("seq_len", int, 4096, "tokens per sequence, for the checkpointed block inputs"),
                Option("seed", int, 0, "seed of the weights"),
            ),
        ),
        Benchmark(
            "parallel-ddp",
            "data-parallel step time on gloo CPU processes: our bucketed DDP and naive DDP vs torch DDP",
            "ltk.bench.parallel_ddp:run_rows",
            (
                Option("world", int, 2, "processes"),
                Option("steps", int, 64, "timed steps per provider"),
                Option("rounds", int, 16, "rounds over the providers, order alternating"),
                Option("n_layer", int, 4, "GPT layers"),
                Option("n_embd", int, 128, "GPT width"),
                Option("vocab_size", int, 512, "vocabulary"),
                Option("seq_len", int, 64, "tokens per sequence"),
                Option("batch", int, 8, "sequences per rank"),
            ),
        ),
        Benchmark(
            "parallel-zero",
            "ZeRO-1/2/3 step time on gloo CPU processes: ours vs FSDP2 and DeepSpeed (where installed), "
            "with memory per rank",
            "ltk.bench.parallel_zero:run",
            (
                Option("world", int, 2, "processes"),
                Option("rounds", int, 3, "rounds over the providers"),
                Option("steps", int, 5, "timed steps per provider per round"),
                Option("n_layer", int, 4, "GPT layers"),
                Option("n_embd", int, 128, "GPT width"),
                Option("vocab", int, 512, "vocabulary"),
                Option("seq", int, 64, "tokens per sequence"),
                Option("batch", int, 8, "sequences per rank"),
                Option("dtype", str, "both", "fp32, bf16 (mixed precision in every provider) or both",
                       ("fp32", "bf16", "both")),
            ),
        ),
        Benchmark(
            "parallel-engines",
            "each of our engines beside the production one of the same strategy (torch DDP, DeepSpeed, FSDP2, "
            "DTensor TP, torch pipelining) in the same training loop: step time, state bytes and bytes moved per rank",
            "ltk.bench.parallel_engines:run",
            (
                Option("world", int, 2, "processes"),
                Option("rounds", int, 3, "rounds over the providers, order alternating"),
                Option("steps", int, 4, "timed steps per provider per round"),
                Option("n_layer", int, 4, "GPT layers"),
                Option("n_embd", int, 128, "GPT width"),
                Option("seq", int, 64, "tokens per sequence"),
                Option("batch", int, 8, "sequences per micro-batch (global; max(2, world) micro-batches per step: "
                       "torch's pipeline needs one per stage)"),
                Option("device", str, "cpu", "cpu (gloo processes) or cuda (one process per GPU, NCCL)",
                       ("cpu", "cuda")),
            ),
        ),
        Benchmark(
            "parallel-memory",
            "each rank's peak memory per phase (init, train, eval, save) of a sharded `ltk train` run against "
            "the plan's per-rank total and one full copy of the model states (16Ψ); gloo CPU processes",
            "ltk.bench.parallel_memory:run",
            (
                Option("preset", str, None, "model preset (default: gpt2-350m; gpt-debug with --quick)"),
                Option("world", int, None, "processes (default: 4; 2 with --quick)"),
                Option("strategy", str, "zero3", "data-parallel engine (ltk train --parallel)",
                       ("ddp", "naive-ddp", "zero1", "zero2", "zero3", "torch-ddp", "fsdp2",
                        "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")),
                Option("seq_len", int, None, "tokens per sequence (default: 128; 64 with --quick)"),
                Option("batch_size", int, 4, "sequences per step, over all ranks"),
                Option("dtype", str, "fp32", "trainer.dtype", ("fp32", "bf16")),
                Option("steps", int, 2, "optimizer steps; the last one evaluates and saves"),
                Option("eval_batches", int, None, "validation batches (default: 2; 1 with --quick)"),
                Option("out", str, "runs/bench-parallel-memory", "run folder (its traces, JSON result and plot)"),
                Option("device", str, "cpu", "cpu (gloo) or cuda (one GPU a rank)", ("cpu", "cuda")),
                Option("quick", bool, False, "gpt-debug on 2 ranks, T=64: the whole path in seconds"),
                Option("min_free_gb", float, 1.0, "kill the run when the machine's available memory falls below"),
                Option("timeout_s", float, 3600.0, "kill the run after this many seconds"),
                Option("interval_ms", float, 25.0, "milliseconds between memory samples"),
                Option("overrides", str, None, "more `ltk train` --section.field value pairs for the run and its plan, "
                       "e.g. '--data.source DIR --model.n_layer 2'"),
                Option("malloc_mmap_threshold", int, 131072, "CPU: MALLOC_MMAP_THRESHOLD_ for every rank, so RSS "
                       "counts live tensors rather than glibc's cached arenas; 0 keeps glibc's default"),
            ),
        ),
        Benchmark(
            "parallel-comm",
            "the bytes each step of `ltk train` sends, by collective, against `ltk plan` on the same flags: every "
            "engine and parallel axis (DDP, ZeRO-1/2/3, FSDP2, TP + SP, CP, PP, DTensor TP), gloo CPU processes",
            "ltk.bench.parallel_comm:run",
            (
                Option("preset", str, "gpt-debug", "model preset"),
                Option("configs", str, None, "comma list of configurations (default: all; see "
                       "ltk/bench/parallel_comm.py CONFIGS)"),
                Option("steps", int, 2, "optimizer steps per run (every one counted)"),
                Option("batch_size", int, 4, "sequences per micro-batch, over all data-parallel ranks"),
                Option("grad_accum", int, 2, "micro-batches per step"),
                Option("seq_len", int, 64, "tokens per sequence"),
                Option("out", str, "runs/bench-parallel-comm", "folder of the runs and the JSON result"),
                Option("quick", bool, False, "ddp, zero3 and fsdp2 only"),
                Option("timeout_s", float, 600.0, "kill a run after this many seconds"),
            ),
        ),
        Benchmark(
            "kernel-static",
            "every Triton kernel (ours, Liger's, a matmul floor) compiled for sm_90a and sm_80 on this CPU: "
            "registers, spills, shared memory, CTAs/SM, the inner loop's SASS mix, an issue-bound ceiling",
            "ltk.bench.kernel_static:run",
            (
                Option("kernels", str, None, "comma list of kernel-name prefixes, e.g. nf4,attention.fwd "
                       "(default: all)"),
                Option("archs", str, "sm_90a,sm_80", "comma list of compile targets: sm_90a (H100), sm_80 (A100)"),
                Option("dtypes", str, "fp16,bf16", "comma list of fp16, bf16"),
                Option("jobs", int, 2, "compiles run in this many processes"),
            ),
        ),
        Benchmark(
            "cli-startup",
            "wall time of `python -m ltk --help` and `ltk train --help` in fresh interpreters, beside "
            "`python -c pass`; whether each imports torch",
            "ltk.bench.cli_startup:run",
            (
                Option("commands", str, "help,train-help", "comma list of help, train-help, bench-help"),
                Option("repeats", int, 10, "timed runs per command (median of them)"),
            ),
        ),
        Benchmark(
            "zero-overlap",
            "ZeRO-1/2 with small buckets vs one bucket on gloo CPU processes: step time, exposed "
            "communication share (per-rank timeline), peak gradient bytes per rank",
            "ltk.bench.zero_overlap:run",
            (
                Option("world", int, 2, "processes"),
                Option("rounds", int, 4, "rounds over the configurations, order alternating"),
                Option("steps", int, 4, "timed steps per configuration per round"),
                Option("n_layer", int, 6, "GPT layers"),
                Option("n_embd", int, 256, "GPT width"),
                Option("vocab", int, 512, "vocabulary"),
                Option("seq", int, 64, "tokens per sequence"),
                Option("batch", int, 8, "sequences per step, over all ranks"),
                Option("bucket_mb", float, 2.0, "bucket size of the bucketed configuration"),
                Option("before", str, None, "git revision: also time ltk/parallel/zero.py as it was there"),
            ),
        ),
    ]
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def run_benchmark(name: str, **kwargs) -> list[Row]:
    """Run the benchmark `name` with keyword options; unknown names and options raise,
    listing the valid ones (a typo must not silently run the default)."""
    bench = get_benchmark(name)
    known = {o.name for o in bench.options}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"benchmark {name!r} has no option(s) {sorted(unknown)}; options: {sorted(known)}")
    return bench.run(**kwargs)


# name -> module of the names re-exported from the harness and the peaks, loaded on first use
_LAZY = {name: "ltk.bench.harness" for name in ("Row", "Timing", "environment", "read_csv", "rows_to_json",
                                                "rows_to_markdown", "time_fn", "write_csv")}
_LAZY.update(measure_peaks="ltk.bench.peaks", peak_for="ltk.bench.peaks")


def __getattr__(name: str):
    """`from ltk.bench import Row` and `ltk.bench.attention` without importing them up front."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = [
    "BENCHMARKS", "Benchmark", "Option", "Row", "Timing", "environment", "get_benchmark",
    "measure_peaks", "peak_for", "read_csv", "rows_to_json", "rows_to_markdown", "run_benchmark",
    "time_fn", "write_csv",
]
