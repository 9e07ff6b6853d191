"""train-step: tokens/s of one full training step, our GPT against Hugging Face's GPT-2.

One step is what a training loop repeats: forward, cross-entropy loss, backward, AdamW
step, zero_grad. Its time decides the cost of training, so it is the first number worth
tracking; every kernel of kernels/ should show up here as a shorter step.

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

Throughput is tokens/s = B·T / median step time. FLOPs per token come from
`models.gpt.flops_per_token` (6N + 12·L·d·T, PaLM appendix B), the same for both models since
they compute the same function, so TFLOP/s and MFU compare like with like.

Peak memory (CUDA only): one extra step after timing, counted as the allocator's high-water
mark above what was allocated before it, plus the provider's own weights and AdamW state
(both models live on the device during the run, so the raw high-water mark would charge each
with the other's). On a CPU it is None: the process's peak RSS is one high-water mark for
the whole run that cannot be reset, so it cannot be split between providers.

    # CPU: gpt-debug, B=8, T=128, fp32 (about 25 s on 2 cores)
    ltk bench train-step
    # one GPU: GPT-2 124M in bf16 autocast, with MFU against the datasheet peak
    ltk bench train-step --preset gpt2-124m --batch-size 16 --device cuda
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from bench.harness import Row, environment, resolve_device, time_fn
from bench.peaks import pct_of_peak, peak_for
from models.gpt import GPT, GPTConfig, flops_per_token, gpt_config
from models.hf.gpt2 import state_dict_to_hf
from training.config import DataConfig, OptimConfig

PROVIDERS = ("ours", "transformers")
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
    converter that exports checkpoints (models/hf/gpt2.py: Conv1D weights are transposed)."""
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), ours.config), strict=False)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("transformers' GPT-2 head is not tied to its embedding")


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; one loss code path for both providers.

    transformers is called with use_cache=False, as a training loop does: the key/value
    cache is for generation and would only add work to a training step."""
    logits = model(x) if isinstance(model, GPT) else model(input_ids=x, use_cache=False).logits
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


def make_step(model, optimizer, batches, amp_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One training step per call, cycling through `batches`; `amp_dtype` turns on autocast."""
    it = itertools.cycle(batches)
    device_type = batches[0][0].device.type

    def step() -> None:
        x, y = next(it)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(cfg: GPTConfig, device: torch.device, seed: int = 0, with_baseline: bool = True) -> dict:
    """{provider: model}: our GPT from `seed`, and transformers' GPT-2 holding a copy of its
    weights (when `with_baseline`)."""
    torch.manual_seed(seed)
    models = {"ours": GPT(cfg).to(device).train()}
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


def run(*, model: str = "gpt", preset: str = "gpt-debug", vocab_size: int | None = None, batch_size: int = 8,
        seq_len: int | None = None, device: str = "auto", dtype: str = "auto",
        min_time: float = 8.0, rounds: int = 4, seed: int = 1337) -> list[Row]:
    """Time the train step of each provider; rows for each, `speedup` relative to transformers.

    vocab_size: None keeps the preset's, or the tokenizer default (2048) for a preset that
    takes it from the data. seq_len: None = block_size. dtype: "auto" = fp32 on a CPU, bf16
    autocast on CUDA. min_time: timed seconds per provider, split over `rounds` rounds.
    model: gpt (the preset's size) or llama | bert | t5 (their debug sizes; bench/train_step_zoo.py)."""
    if model != "gpt":
        from bench.train_step_zoo import ZOO, run as run_zoo

        if model not in ZOO:
            raise ValueError(f"model must be gpt or one of {sorted(ZOO)}, got {model!r}")
        return run_zoo(model, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, device=device,
                       min_time=min_time, rounds=rounds, seed=seed)
    dev = resolve_device(device)
    cfg = gpt_config(preset)
    if vocab_size or not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size or DataConfig().vocab_size)
    T = seq_len or cfg.block_size
    dtype = dtype if dtype != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be auto, fp32 or bf16, got {dtype!r}")
    amp = torch.bfloat16 if dtype == "bf16" else None

    try:
        _import_transformers()
        providers = PROVIDERS
    except ImportError:
        warnings.warn(MISSING_TRANSFORMERS, RuntimeWarning, stacklevel=2)
        providers = ("ours",)
    models = build(cfg, dev, seed, with_baseline="transformers" in providers)
    batches = make_batches(cfg.vocab_size, batch_size, T, seed=seed, device=dev)
    check = check_same_loss(models["ours"], models["transformers"], *batches[0]) if len(providers) > 1 else None
    optims = {p: make_optimizer(m, dev) for p, m in models.items()}
    steps = {p: make_step(models[p], optims[p], batches, amp) for p in providers}

    load_before = environment(dev)["load_avg_1m"]
    timings = {}
    for r in range(rounds):
        for p in providers if r % 2 == 0 else providers[::-1]:  # ABBA: neither always goes first
            t = time_fn(steps[p], device=dev, warmup=min(0.25, min_time / rounds), min_time=min_time / rounds)
            timings[p] = timings[p].merge(t) if p in timings else t

    env = environment(dev)
    peak = peak_for(env["device"]) if dev.type == "cuda" and dtype == "bf16" else None
    tokens = batch_size * T
    fpt = flops_per_token(cfg, T)
    tps = {p: tokens / (timings[p].median_ms * 1e-3) for p in providers}
    base = tps.get("transformers")
    oc = OptimConfig()
    rows = []
    for p in providers:
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
        }
        if p == "transformers":
            tf = _import_transformers()
            extra.update(transformers=tf.__version__,
                         attn_implementation=models[p].config._attn_implementation)
        if base is None:
            extra["baseline_missing"] = MISSING_TRANSFORMERS
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
    return rows
