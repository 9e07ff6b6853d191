"""train-step for the rest of the zoo: our Llama, BERT and T5 against transformers' same-config
models (`ltk bench train-step --model llama|bert|t5`), by the rules of ltk/bench/train_step.py:
the same weights (copied through our converters in ltk/models/hf/, then the logits are checked
equal before anything is timed), the same batches, the same AdamW, providers alternating.

The step is each family's own objective: next-token loss for Llama, a masked-LM loss on
15% of positions for BERT, and for T5 an encoder pass over T tokens with a decoder pass
over T/4 target tokens (span corruption's targets are about a quarter of the input).
Throughput counts the encoder's input tokens. Our models' loss is F.cross_entropy on their
logits; transformers' Llama and BERT compute theirs inside the model from `labels` (what a
Hugging Face training loop does, and where a patched loss takes over).

Providers (`providers=`; default ours,transformers):
  ours                 our model (ltk/models/)
  transformers         transformers' model holding a copy of our weights
  transformers+ours    the same transformers model after `ltk.patch` (ltk/models/hf/patch.py): our
                       norms, attention, SwiGLU, RoPE and fused linear cross-entropy (Llama, BERT)
  transformers+liger   the same after Liger-Kernel's `apply_liger_kernel_to_llama(model=...)`
                       (Llama; Liger's kernels are Triton: CUDA only, skipped on a CPU with the reason)
The patched providers must give the first step's loss of transformers within 1e-4 in fp32, or the
benchmark refuses to run. Peak memory is measured on one extra step: CUDA's allocator high-water
mark, or on a CPU the tensors alive at once (ltk/bench/live_bytes.py), plus weights and AdamW state.

    ltk bench train-step --model llama --providers transformers,transformers+ours,transformers+liger
    # the logits' memory end to end: Llama-3's vocabulary
    ltk bench train-step --model llama --providers transformers,transformers+ours --vocab-size 128256 \\
        --batch-size 2
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import itertools
import json

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, environment, resolve_device, time_fn
from ltk.bench.sweep import Skip, SweepRows, parse_choices
from ltk.bench.train_step import _cuda_step_peak_mb, make_optimizer, warm_up
from ltk.models import bert, llama, t5
from ltk.models.hf import bert as hf_bert
from ltk.models.hf import llama as hf_llama
from ltk.models.hf import t5 as hf_t5

# family -> (our preset config, converter, transformers config class, transformers model class)
ZOO = {
    "llama": (lambda V: llama.llama_config("llama-debug", vocab_size=V), hf_llama, "LlamaConfig", "LlamaForCausalLM"),
    "bert": (lambda V: bert.bert_config("bert-debug", vocab_size=V), hf_bert, "BertConfig", "BertForMaskedLM"),
    "t5": (lambda V: t5.t5_config("t5-debug", vocab_size=V), hf_t5, "T5Config", "T5ForConditionalGeneration"),
}
MODEL_CLS = {"llama": llama.Llama, "bert": bert.Bert, "t5": t5.T5}
PROVIDERS = ("ours", "transformers", "transformers+ours", "transformers+liger")
DEFAULT_PROVIDERS = ("ours", "transformers")
FAMILIES_OF = {"transformers+ours": ("llama", "bert"), "transformers+liger": ("llama",)}
PATCHED_LOSS_TOL = 1e-4  # fp32: |first-step loss of a patched provider − transformers'|


def _batches(family: str, V: int, B: int, T: int, seed: int, dev, n: int = 4) -> list[tuple]:
    """(inputs..., labels) per batch; labels -100 where nothing is predicted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if family == "llama":
            tok = torch.randint(V, (B, T + 1), generator=g)
            b = (tok[:, :-1], tok[:, 1:])
        elif family == "bert":
            x = torch.randint(V, (B, T), generator=g)
            chosen = torch.rand(B, T, generator=g) < 0.15
            b = (x, torch.where(chosen, x, torch.full_like(x, -100)))
        else:
            enc, dec = torch.randint(V, (B, T), generator=g), torch.randint(V, (B, max(2, T // 4)), generator=g)
            b = (enc, dec, dec.roll(-1, dims=1))
        out.append(tuple(t.contiguous().to(dev) for t in b))  # transformers' loss views the labels flat
    return out


def _logits(family: str, model, batch, ours: bool) -> torch.Tensor:
    if family == "t5":
        enc, dec = batch[0], batch[1]
        return model(enc, dec) if ours else model(input_ids=enc, decoder_input_ids=dec, use_cache=False).logits
    x = batch[0]
    if ours:
        return model(x)
    return model(input_ids=x, use_cache=False).logits if family == "llama" else model(input_ids=x).logits


def _loss(family, model, batch, ours):
    if not ours and family == "llama":  # targets given unshifted: they are already the next tokens
        return model(input_ids=batch[0], labels=batch[1], shift_labels=batch[1], use_cache=False).loss
    if not ours and family == "bert":
        return model(input_ids=batch[0], labels=batch[1]).loss
    logits = _logits(family, model, batch, ours)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[-1].flatten(), ignore_index=-100)


def parse_providers(family: str, providers: str | None) -> tuple[str, ...]:
    if providers is None:
        return DEFAULT_PROVIDERS
    chosen = PROVIDERS if providers.strip() == "all" else parse_choices(providers, PROVIDERS, "providers")
    for p in chosen:
        if p in FAMILIES_OF and family not in FAMILIES_OF[p] and providers.strip() != "all":
            raise ValueError(f"provider {p} applies to {' and '.join(FAMILIES_OF[p])}, not {family}")
    return tuple(p for p in PROVIDERS if p in chosen and (p not in FAMILIES_OF or family in FAMILIES_OF[p]))


@contextlib.contextmanager
def _swapped(module, names: dict):
    """Set module globals for the duration (Liger patches transformers' modeling module itself)."""
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _liger(hf, dev):
    """(a copy of `hf` patched by Liger, the modeling_llama globals Liger sets), or a Skip. The globals
    are restored at once, so that the other providers keep transformers' own; they are put back around
    Liger's steps only."""
    if importlib.util.find_spec("liger_kernel") is None:
        return Skip("transformers+liger", "*", "liger_kernel is not installed (pip install liger-kernel)")
    if dev.type != "cuda":
        return Skip("transformers+liger", "*", "Liger's kernels are Triton kernels for CUDA; this run is on a CPU")
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    model = copy.deepcopy(hf)
    before = dict(vars(modeling_llama))
    apply_liger_kernel_to_llama(model=model)
    changed = {k: v for k, v in vars(modeling_llama).items() if before.get(k) is not v}
    for k in changed:
        setattr(modeling_llama, k, before[k])
    return model, (modeling_llama, changed)


def run(family: str, *, vocab_size: int | None = None, batch_size: int = 8, seq_len: int | None = None,
        device: str = "auto", min_time: float = 8.0, rounds: int = 4, seed: int = 1337,
        providers: str | None = None, dtype: str = "auto") -> SweepRows:
    import transformers as tf

    import ltk

    dev = resolve_device(device)
    provs = parse_providers(family, providers)
    dtype = dtype if dtype != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    amp = torch.bfloat16 if dtype == "bf16" else None
    make_cfg, conv, tf_cfg, tf_model = ZOO[family]
    cfg = make_cfg(vocab_size or 2048)
    T = seq_len or getattr(cfg, "block_size", None) or 128
    torch.manual_seed(seed)
    ours = MODEL_CLS[family](cfg).to(dev).train()
    hf_config = getattr(tf, tf_cfg)(**conv.config_to_hf(cfg))
    hf_config._attn_implementation = "sdpa"
    hf = getattr(tf, tf_model)(hf_config).to(dev).train()
    hf.load_state_dict(conv.state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    batches = _batches(family, cfg.vocab_size, batch_size, T, seed, dev)

    ours.eval(), hf.eval()
    with torch.no_grad():
        diff = (_logits(family, ours, batches[0], True) - _logits(family, hf, batches[0], False)).abs().max().item()
    ours.train(), hf.train()
    if diff > 1e-4:
        raise RuntimeError(f"our {family} and transformers' disagree after the weight copy (max |Δlogit| {diff:.2e})")

    models, skipped, swaps = {"ours": ours, "transformers": hf}, [], {}
    if "transformers+ours" in provs:
        models["transformers+ours"] = ltk.patch(copy.deepcopy(hf))
    if "transformers+liger" in provs:
        got = _liger(hf, dev)
        if isinstance(got, Skip):
            skipped.append(got)
        else:
            models["transformers+liger"], swaps["transformers+liger"] = got
    steps, optims = {}, {}
    for p in [p for p in provs if p in models]:
        m, it = models[p], itertools.cycle(batches)
        opt = optims[p] = make_optimizer(m, dev)
        module, names = swaps.get(p, (None, {}))

        def step(m=m, opt=opt, it=it, is_ours=p == "ours", module=module, names=names):
            with _swapped(module, names) if names else contextlib.nullcontext(), \
                    torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = _loss(family, m, next(it), is_ours)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        steps[p] = step
    first_loss, _, failed = warm_up(steps, {p: 1 for p in steps})
    skipped += failed
    run_provs = [p for p in provs if p in first_loss]
    for p in run_provs:
        if p.startswith("transformers+") and amp is None and "transformers" in first_loss:
            d = abs(first_loss[p] - first_loss["transformers"])
            if not d < PATCHED_LOSS_TOL:
                raise RuntimeError(f"{p}'s first-step loss differs from transformers' by {d:.2e} (tolerance "
                                   f"{PATCHED_LOSS_TOL:g} in fp32): not the same computation, no fair timing")
    timings = {}
    for r in range(rounds):
        for p in run_provs if r % 2 == 0 else run_provs[::-1]:  # ABBA: neither always goes first
            t = time_fn(steps[p], device=dev, warmup=min(0.25, min_time / rounds), min_time=min_time / rounds)
            timings[p] = timings[p].merge(t) if p in timings else t
    from ltk.bench.live_bytes import step_peak_mb

    measure = _cuda_step_peak_mb if dev.type == "cuda" else step_peak_mb
    peaks = {p: measure(steps[p], models[p], optims[p]) for p in run_provs}
    env = environment(dev)
    tokens = batch_size * T
    tps = {p: tokens / (timings[p].median_ms * 1e-3) for p in run_provs}
    base = tps.get("transformers")
    rows = []
    for p in run_provs:
        t = timings[p]
        extra = {"family": family, "model": dataclasses.asdict(cfg), "max_logit_diff": diff,
                 "threads": env["torch_threads"], "first_step_loss": first_loss[p],
                 "transformers": tf.__version__ if p != "ours" else None,
                 "patched": ltk.patched(models[p]) if p == "transformers+ours" else None,
                 "peak_mem": "cuda allocator" if dev.type == "cuda" else "live tensors (ltk/bench/live_bytes.py)"}
        rows.append(Row.stamped(
            dev, op=f"train-step[{family}]", shape=f"B={batch_size},T={T},V={cfg.vocab_size}", dtype=dtype,
            mode="step", provider=p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
            throughput=tps[p], throughput_unit="tokens/s", speedup=tps[p] / base if base else None,
            peak_mem_mb=peaks[p], extra=json.dumps(extra, sort_keys=True, default=str),
        ))
    return SweepRows(rows, skipped)
