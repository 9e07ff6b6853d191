"""train-step: tokens/s of one full training step, our GPT (eager, and torch.compile'd) against
Hugging Face's GPT-2.

One step is what a training loop repeats: forward, cross-entropy loss, backward, AdamW
step, zero_grad. Its time decides the cost of training, so it is the first number worth
tracking; every kernel of ltk/kernels/ should show up here as a shorter step.

A comparison is only fair when the two sides do the same work. So, in one process:
  - the same architecture: transformers' `GPT2LMHeadModel` from a `GPT2Config` with our
    sizes, dropout 0, tanh-GELU ("gelu_new"), LayerNorm eps 1e-5, tied head; and this is
    *proved*, not assumed: our weights are copied into it and both must give the same loss
    and logits on a batch in fp32 (|Δ| < 1e-4), or the benchmark refuses to run;
  - the same data (a few fixed, seeded random batches, cycled in the same order), the same
    loss code, the same AdamW settings (training.config.OptimConfig's defaults, no clipping,
    no schedule) and implementation (foreach on CPU, fused on CUDA);
  - the same conditions: providers alternate over a few rounds (ABBA order) so warm-up,
    caches, clock boost and background load hit both alike; samples are pooled per provider.

Providers (`providers=`, a comma list, or "all"):
  ours          our GPT, eager: every op is its own kernel (ours from ltk/kernels/ on CUDA);
  ours-compile  the same GPT (a copy of the same weights) wrapped in `torch.compile`, in the
                same step with the same data and AdamW: TorchDynamo captures the forward,
                AOTAutograd derives the backward graph, Inductor fuses the elementwise chains
                (bias + GELU, residual adds, the loss' softmax pieces) into generated kernels,
                so fewer activation round trips to memory. The compile happens in the first
                steps, which are warm-up and never timed; their seconds are reported apart
                (`warmup_s`). Not in the default list: on a small CPU the C++ compile of the
                forward and backward takes minutes, longer than the whole default benchmark;
  transformers  transformers' GPT-2 holding a copy of our weights (eager).
The default is ours,transformers. Every provider's first step starts from the same weights on
the same batch, so its loss is recorded (`first_step_loss`); in fp32 without dropout the
compiled model must match ours within 1e-4 or the benchmark refuses to run (in bf16 autocast
the two round differently, so the difference is recorded, not enforced).

Throughput is tokens/s = B·T / median step time. FLOPs per token come from
`models.gpt.flops_per_token` (6N + 12·L·d·T, PaLM appendix B), the same for both models since
they compute the same function, so TFLOP/s and MFU compare like with like. MFU (% of peak) is
reported on CUDA in bf16, against the device's datasheet dense bf16 peak (ltk/bench/peaks.py).

Peak memory (CUDA only): one extra step after timing, counted as the allocator's high-water
mark above what was allocated before it, plus the provider's own weights and AdamW state
(both models live on the device during the run, so the raw high-water mark would charge each
with the other's). On a CPU it is None: the process's peak RSS is one high-water mark for
the whole run that cannot be reset, so it cannot be split between providers.

    # CPU: gpt-debug, B=8, T=128, fp32 (about 25 s on 2 cores)
    ltk bench train-step
    # one GPU: GPT-2 124M in bf16 autocast, with MFU against the datasheet peak
    ltk bench train-step --preset gpt2-124m --batch-size 16 --device cuda
    # the same with the compiled model beside eager (from Python, or python -m ltk.bench.gpu_check)
    from ltk.bench.train_step import run
    run(preset="gpt2-124m", batch_size=16, device="cuda", providers="ours,ours-compile,transformers")
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, environment, resolve_device, time_fn
from ltk.bench.peaks import pct_of_peak, peak_for
from ltk.bench.sweep import Skip, SweepRows, failure, parse_choices
from ltk.models.gpt import GPT, GPTConfig, flops_per_token, gpt_config
from ltk.models.hf.gpt2 import state_dict_to_hf
from ltk.training.config import DataConfig, OptimConfig
from ltk.training.progress import progress

PROVIDERS = ("ours", "ours-compile", "transformers")
DEFAULT_PROVIDERS = ("ours", "transformers")  # ours-compile on request: its compile is slow on a CPU
WARMUP_STEPS = {"ours": 1, "ours-compile": 3, "transformers": 1}  # untimed; compiling happens in the first
COMPILED_LOSS_TOL = 1e-4  # fp32: |first-step loss of ours-compile − ours| must stay below this
MISSING_TRANSFORMERS = (
    "transformers is not installed, so train-step has no baseline and reports our row only; "
    "install the project's `dev` or `baselines` extra to get it (pip install -e '.[dev]')"
)


def _import_transformers():
    import transformers

    return transformers


def hf_gpt2(cfg: GPTConfig):
    """transformers' GPT2LMHeadModel with our config's sizes (random weights, no download)."""
    if not cfg.bias:
        raise ValueError("transformers' GPT-2 always has biases; use a config with bias=True")
    tf = _import_transformers()
    hf_cfg = tf.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.n_embd,
        activation_function="gelu_new",  # GPT-2's tanh approximation of GELU, like ours
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default, which our GPT uses
        tie_word_embeddings=True,
        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
        attn_implementation="sdpa",  # the same fused attention entry point as ours
    )
    return tf.GPT2LMHeadModel(hf_cfg)


@torch.no_grad()
def copy_weights_to_hf(ours: GPT, hf) -> None:
    """Copy our GPT's weights into a transformers GPT-2 of the same sizes, through the same
    converter that exports checkpoints (ltk/models/hf/gpt2.py: Conv1D weights are transposed)."""
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), ours.config), strict=False)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("transformers' GPT-2 head is not tied to its embedding")


def parse_providers(providers: str | None) -> tuple[str, ...]:
    """None -> the default (ours, transformers); "all" -> every provider; else a comma list,
    e.g. "ours,ours-compile". Returned in the canonical order of PROVIDERS; an unknown name
    raises ValueError listing the known ones."""
    if providers is None:
        return DEFAULT_PROVIDERS
    if not isinstance(providers, str):
        raise TypeError(f"providers must be a comma-separated string or None, got {type(providers).__name__}")
    chosen = PROVIDERS if providers.strip() == "all" else parse_choices(providers, PROVIDERS, "providers")
    return tuple(p for p in PROVIDERS if p in chosen)


def compile_model(model: GPT, backend: str = "inductor") -> torch.nn.Module:
    """`torch.compile` of a copy of `model` (same weights, its own parameters, so it can train
    beside the eager one with its own AdamW). backend: "inductor" (generated kernels, what
    training uses), or "aot_eager" / "eager" (capture only; for tests on a slow CPU)."""
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"compile_backend must be a torch.compile backend name, got {backend!r}")
    return torch.compile(copy.deepcopy(model), backend=backend)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; one loss code path for every provider.

    transformers is called with use_cache=False, as a training loop does: the key/value
    cache is for generation and would only add work to a training step. A compiled model
    (torch.compile's wrapper) is called like the module it wraps (`_orig_mod`)."""
    ours = isinstance(getattr(model, "_orig_mod", model), GPT)
    logits = model(x) if ours else model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B·T, V) vs (B·T,)


def check_same_loss(ours: GPT, hf, x: torch.Tensor, y: torch.Tensor, tol: float = 1e-4) -> dict:
    """Compare both models on one batch (run it in fp32); raise when the losses, or any
    logit, differ by `tol` or more: then the two configs do not describe the same model
    and a timing would not compare like with like. The logits are checked as well because
    at initialization the loss is close to ln V whatever the weights, so a wrong copy can
    move it by little."""
    modes, precision = (ours.training, hf.training), torch.get_float32_matmul_precision()
    ours.eval(), hf.eval()  # no dropout: both must be deterministic functions of x
    torch.set_float32_matmul_precision("highest")  # true fp32, not TF32, for the comparison
    try:
        with torch.no_grad():
            la = ours(x)  # (B, T, V)
            lb = hf(input_ids=x, use_cache=False).logits
            a = F.cross_entropy(la.flatten(0, 1), y.flatten()).item()
            b = F.cross_entropy(lb.flatten(0, 1), y.flatten()).item()
            max_logit_diff = (la - lb).abs().max().item()
    finally:
        ours.train(modes[0]), hf.train(modes[1])
        torch.set_float32_matmul_precision(precision)
    check = {"loss_ours": a, "loss_transformers": b, "abs_diff": abs(a - b),
             "max_logit_diff": max_logit_diff, "tol": tol}
    if not (abs(a - b) < tol and max_logit_diff < tol):
        raise RuntimeError(f"our GPT and transformers' GPT-2 disagree after the weight copy: {check}")
    return check


def make_batches(vocab_size: int, batch_size: int, seq_len: int, *, n: int = 4, seed: int = 0,
                 device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` fixed random (inputs, next-token targets) batches of shape (B, T), from a seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=gen)  # (B, T+1)
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


def make_optimizer(model: torch.nn.Module, device: torch.device, oc: OptimConfig | None = None):
    """AdamW with the training defaults; decay on matrices only (as GPT.param_groups does)."""
    oc = oc or OptimConfig()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    groups = [{"params": decay, "weight_decay": oc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, **impl)


def make_step(model, optimizer, batches, amp_dtype: torch.dtype | None = None) -> Callable[[], torch.Tensor]:
    """One training step per call, cycling through `batches`; `amp_dtype` turns on autocast.
    Returns the step's loss, detached (reading its value waits for the device)."""
    it = itertools.cycle(batches)
    device_type = batches[0][0].device.type

    def step() -> torch.Tensor:
        x, y = next(it)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def build(cfg: GPTConfig, device: torch.device, seed: int = 0, with_baseline: bool = True,
          compile_backend: str | None = None) -> dict:
    """{provider: model}: our GPT from `seed`; transformers' GPT-2 holding a copy of its
    weights (when `with_baseline`); and, when `compile_backend` is given, "ours-compile": a
    copy of our GPT wrapped in torch.compile with that backend (compiled at its first call)."""
    torch.manual_seed(seed)
    models = {"ours": GPT(cfg).to(device).train()}
    if compile_backend is not None:
        models["ours-compile"] = compile_model(models["ours"], compile_backend)
    if with_baseline:
        hf = hf_gpt2(cfg).to(device).train()
        copy_weights_to_hf(models["ours"], hf)
        models["transformers"] = hf
    return models


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _cuda_step_peak_mb(step, model, optimizer) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before + _state_bytes(model, optimizer)) / 2**20


def warm_up(steps: dict[str, Callable[[], torch.Tensor]], counts: dict[str, int] | None = None
            ) -> tuple[dict[str, float], dict[str, float], list[Skip]]:
    """Run each provider's first, untimed steps: ({provider: first-step loss}, {provider:
    seconds}, skips). The compiled model compiles here. A provider whose warm-up raises is
    skipped with the reason, except ours (eager): its failure is a bug and raises."""
    counts = counts or WARMUP_STEPS
    losses, seconds, skipped = {}, {}, []
    for p, step in steps.items():
        t0 = time.perf_counter()
        try:
            losses[p] = step().item()  # .item() waits for the device
            last = None
            for _ in range(counts.get(p, 1) - 1):
                last = step()
            if last is not None:
                last.item()  # the seconds count the work, not its launch
        except Exception as e:  # noqa: BLE001 - an optional provider's failure is a result
            if p == "ours":
                raise
            warnings.warn(f"train-step: {p} failed in its warm-up and is skipped: {failure(e)}",
                          RuntimeWarning, stacklevel=2)
            skipped.append(Skip(p, "*", failure(e)))
            continue
        seconds[p] = time.perf_counter() - t0
    return losses, seconds, skipped


def run(*, model: str = "gpt", preset: str = "gpt-debug", vocab_size: int | None = None, batch_size: int = 8,
        seq_len: int | None = None, device: str = "auto", dtype: str = "auto",
        min_time: float = 8.0, rounds: int = 4, seed: int = 1337, providers: str | None = None,
        compile_backend: str = "inductor") -> SweepRows:
    """Time the train step of each provider; rows for each, `speedup` relative to transformers.

    vocab_size: None keeps the preset's, or the tokenizer default (2048) for a preset that
    takes it from the data. seq_len: None = block_size. dtype: "auto" = fp32 on a CPU, bf16
    autocast on CUDA. min_time: timed seconds per provider, split over `rounds` rounds.
    providers: comma list of ours, ours-compile, transformers, or "all"; None = ours,transformers. For
    llama and bert also transformers+ours (transformers' model after ltk.patch) and, for llama,
    transformers+liger (after Liger's patch); see ltk/bench/train_step_zoo.py.
    compile_backend: torch.compile backend of ours-compile (inductor; aot_eager for quick tests).
    model: gpt (the preset's size) or llama | bert | t5 (their debug sizes; ltk/bench/train_step_zoo.py).
    Returns the rows as a list carrying `.skipped` (ltk/bench/sweep.py's SweepRows): each requested
    provider that did not run, and why."""
    if model != "gpt":
        from ltk.bench.train_step_zoo import ZOO
        from ltk.bench.train_step_zoo import run as run_zoo

        if model not in ZOO:
            raise ValueError(f"model must be gpt or one of {sorted(ZOO)}, got {model!r}")
        return run_zoo(model, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, device=device,
                       min_time=min_time, rounds=rounds, seed=seed, providers=providers, dtype=dtype)
    requested = parse_providers(providers)
    dev = resolve_device(device)
    cfg = gpt_config(preset)
    if vocab_size or not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size or DataConfig().vocab_size)
    T = seq_len or cfg.block_size
    dtype = dtype if dtype != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be auto, fp32 or bf16, got {dtype!r}")
    amp = torch.bfloat16 if dtype == "bf16" else None

    skipped: list[Skip] = []
    provs = requested
    if "transformers" in provs:
        try:
            _import_transformers()
        except ImportError:
            warnings.warn(MISSING_TRANSFORMERS, RuntimeWarning, stacklevel=2)
            skipped.append(Skip("transformers", "*", MISSING_TRANSFORMERS))
            provs = tuple(p for p in provs if p != "transformers")
    models = build(cfg, dev, seed, with_baseline="transformers" in provs,
                   compile_backend=compile_backend if "ours-compile" in provs else None)
    batches = make_batches(cfg.vocab_size, batch_size, T, seed=seed, device=dev)
    check = check_same_loss(models["ours"], models["transformers"], *batches[0]) if "transformers" in provs else None
    optims = {p: make_optimizer(models[p], dev) for p in provs}
    steps = {p: make_step(models[p], optims[p], batches, amp) for p in provs}
    first_loss, warmup_s, failed = warm_up(steps)
    skipped += failed
    provs = tuple(p for p in provs if p in first_loss)
    if "ours" in first_loss and "ours-compile" in first_loss:
        compiled_diff = abs(first_loss["ours-compile"] - first_loss["ours"])
        if amp is None and cfg.dropout == 0 and not compiled_diff < COMPILED_LOSS_TOL:
            raise RuntimeError(f"ours-compile's first-step loss {first_loss['ours-compile']:.6f} differs from "
                               f"ours {first_loss['ours']:.6f} by {compiled_diff:.2e} (tolerance "
                               f"{COMPILED_LOSS_TOL:g} in fp32): the compiled model does not compute the same "
                               "function, so its timing would not compare like with like")
    if not provs:
        return SweepRows([], skipped)

    load_before = environment(dev)["load_avg_1m"]
    timings = {}
    bar = progress(total=rounds * len(provs), desc="train-step", unit="timing")
    for r in range(rounds):
        for p in provs if r % 2 == 0 else provs[::-1]:  # ABBA: neither always goes first
            t = time_fn(steps[p], device=dev, warmup=min(0.25, min_time / rounds), min_time=min_time / rounds)
            timings[p] = timings[p].merge(t) if p in timings else t
            bar.update(1)
    bar.close()

    env = environment(dev)
    peak = peak_for(env["device"]) if dev.type == "cuda" and dtype == "bf16" else None
    tokens = batch_size * T
    fpt = flops_per_token(cfg, T)
    tps = {p: tokens / (timings[p].median_ms * 1e-3) for p in provs}
    base = tps.get("transformers")
    oc = OptimConfig()
    rows = []
    for p in provs:
        t = timings[p]
        tflops = tps[p] * fpt / 1e12
        extra = {
            "preset": preset, "model": dataclasses.asdict(cfg), "batch_size": batch_size, "seq_len": T,
            "tokens_per_step": tokens, "flops_per_token": fpt, "rounds": rounds,
            "precision": "fp32" if amp is None else f"{dtype} autocast, fp32 weights and AdamW",
            "optimizer": {"name": "AdamW", "lr": oc.lr, "betas": [oc.beta1, oc.beta2], "eps": oc.eps,
                          "weight_decay": oc.weight_decay, "impl": "fused" if dev.type == "cuda" else "foreach",
                          "grad_clip": None, "lr_schedule": None},
            "threads": env["torch_threads"], "load_avg_1m_before": load_before,
            "baseline": "transformers" if base else None,
            "loss_check": check,
            "warmup_steps": WARMUP_STEPS[p], "warmup_s": warmup_s[p], "first_step_loss": first_loss[p],
        }
        if p == "ours-compile":
            extra.update(compile_backend=compile_backend,
                         first_step_loss_diff_vs_ours=(abs(first_loss[p] - first_loss["ours"])
                                                       if "ours" in first_loss else None))
        if p == "transformers":
            tf = _import_transformers()
            extra.update(transformers=tf.__version__,
                         attn_implementation=models[p].config._attn_implementation)
        if base is None and "transformers" in requested:  # asked for, but not installed or failed
            extra["baseline_missing"] = next(s.reason for s in skipped if s.provider == "transformers")
        rows.append(Row.stamped(
            dev, op="train-step", shape=f"B={batch_size},T={T},L={cfg.n_layer},d={cfg.n_embd},"
            f"H={cfg.n_head},V={cfg.vocab_size}", dtype=dtype, mode="step", provider=p,
            median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
            throughput=tps[p], throughput_unit="tokens/s", tflops=tflops,
            pct_of_peak=pct_of_peak(tflops, peak and peak.bf16_tflops),
            speedup=tps[p] / base if base else None,
            peak_mem_mb=_cuda_step_peak_mb(steps[p], models[p], optims[p]) if dev.type == "cuda" else None,
            extra=json.dumps(extra, sort_keys=True),
        ))
    return SweepRows(rows, skipped)
