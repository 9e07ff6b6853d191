"""train-step for the rest of the zoo: our Llama, BERT and T5 against transformers' same-config
models (`ltk bench train-step --model llama|bert|t5`), by the rules of ltk/bench/train_step.py:
the same weights (copied through our converters in ltk/models/hf/, then the logits are checked
equal before anything is timed), the same batches, the same AdamW, providers alternating.

The step is each family's own objective: next-token loss for Llama, a masked-LM loss on
15% of positions for BERT, and for T5 an encoder pass over T tokens with a decoder pass
over T/4 target tokens (span corruption's targets are about a quarter of the input).
Throughput counts the encoder's input tokens.
"""
from __future__ import annotations

import dataclasses
import itertools
import json

import torch
import torch.nn.functional as F

from ltk.bench.harness import Row, environment, resolve_device, time_fn
from ltk.bench.train_step import make_optimizer
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
        out.append(tuple(t.to(dev) for t in b))
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
    logits = _logits(family, model, batch, ours)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[-1].flatten(), ignore_index=-100)


def run(family: str, *, vocab_size: int | None = None, batch_size: int = 8, seq_len: int | None = None,
        device: str = "auto", min_time: float = 8.0, rounds: int = 4, seed: int = 1337) -> list[Row]:
    import transformers as tf

    dev = resolve_device(device)
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

    models = {"ours": ours, "transformers": hf}
    steps = {}
    for p, m in models.items():
        opt, it = make_optimizer(m, dev), itertools.cycle(batches)

        def step(m=m, opt=opt, it=it, is_ours=p == "ours"):
            _loss(family, m, next(it), is_ours).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[p] = step
    timings = {}
    for r in range(rounds):
        for p in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
            t = time_fn(steps[p], device=dev, warmup=min(0.25, min_time / rounds), min_time=min_time / rounds)
            timings[p] = timings[p].merge(t) if p in timings else t
    env = environment(dev)
    tokens = batch_size * T
    tps = {p: tokens / (timings[p].median_ms * 1e-3) for p in models}
    rows = []
    for p in models:
        t = timings[p]
        extra = {"family": family, "model": dataclasses.asdict(cfg), "max_logit_diff": diff,
                 "threads": env["torch_threads"], "transformers": tf.__version__ if p == "transformers" else None}
        rows.append(Row.stamped(
            dev, op=f"train-step[{family}]", shape=f"B={batch_size},T={T},V={cfg.vocab_size}", dtype="fp32",
            mode="step", provider=p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
            throughput=tps[p], throughput_unit="tokens/s", speedup=tps[p] / tps["transformers"],
            extra=json.dumps(extra, sort_keys=True, default=str),
        ))
    return rows
