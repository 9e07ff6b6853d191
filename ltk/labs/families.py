"""Lab `families`: the same text, the same number of steps — what do GPT, Llama, BERT and T5
cost, and how does each one's loss fall?

    ltk lab run families --quick     # the four *-debug models on a CPU, a few minutes
    ltk lab run families             # longer runs of the same models (a GPU)

Each family trains through the same Trainer as `ltk train --preset <family>-debug` on the
embedded corpus, with its own pre-training objective (ltk/training/objectives.py):

    gpt, llama   causal LM          predict every next token            loss over all T targets
    bert         masked LM          predict the 15% chosen tokens        loss over ~0.15·T targets
    t5           span corruption    write the dropped spans              loss over ~0.15·T + sentinels

The table puts the cost side by side — parameters, training FLOPs per token of text (each
family's formula, ltk/models/*.py), measured tokens/s — with the final validation loss. The losses
are in nats per *predicted* token and answer different questions (a masked token has context
on both sides; a causal one only on the left), so they are not a ranking: the comparable figure
is bits per byte, which only the causal models define. The plot shows each validation loss
against the training FLOPs spent, the axis on which scaling studies compare models.
"""
from __future__ import annotations

import time
from pathlib import Path

from ltk.labs.registry import Lab
from ltk.labs.report import Report
from ltk.models import get_family
from ltk.training.config import RunConfig
from ltk.training.presets import get_preset
from ltk.training.progress import progress
from ltk.training.run_plot import read_metrics
from ltk.training.trainer import Trainer

FAMILIES = ("gpt", "llama", "bert", "t5")
PREDICTS = {"gpt": "every next token", "llama": "every next token", "bert": "15% masked tokens",
            "t5": "dropped spans (15%)"}


def family_config(family: str, quick: bool) -> RunConfig:
    cfg = get_preset(f"{family}-debug")
    cfg.trainer.max_steps = 300 if quick else 3000
    cfg.trainer.eval_every = 100 if quick else 250
    cfg.trainer.eval_batches = 16
    cfg.trainer.ckpt_every = 0  # the final checkpoint only
    cfg.trainer.progress = True
    return cfg


def _plot(curves: dict[str, list[tuple[float, float]]]):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=family)
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="val loss (nats / predicted token)",
           title="Validation loss against compute")
    # labels at 1, 2 and 5 x 10^k only: the default labels every minor tick of a short log axis,
    # and "3x10^11" runs into "4x10^11"
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(1e9, 1e9)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not over their last points
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool, families: tuple[str, ...] = FAMILIES) -> Path:
    rows, curves, results = [], {}, {}
    for family in progress(families, desc="families lab", unit="family"):
        cfg = family_config(family, quick)
        cfg.trainer.out_dir = str(out / family)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        fpt = get_family(family).flops_per_token(cfg.model, trainer.seq_len)
        metrics = read_metrics(out / family / "metrics.jsonl")
        evals = [m for m in metrics if "val_loss" in m]
        curves[family] = [(m["tokens"] * fpt, m["val_loss"]) for m in evals]
        final = evals[-1]
        tokens = result.step * trainer.tokens_per_step
        tok_s = tokens / seconds
        rows.append([family, trainer.objective.name, PREDICTS[family], trainer.num_params, round(fpt),
                     round(tok_s), f"{tokens * fpt:.3g}", final["val_loss"], final.get("val_bpb", "—")])
        results[family] = {"params": trainer.num_params, "flops_per_token": fpt, "tokens_per_s": tok_s,
                           "steps": result.step, "tokens": tokens, "seconds": seconds, "final": final,
                           "first_eval": evals[0], "config": cfg.to_dict()}

    command = "ltk lab run families" + (" --quick" if quick else "")
    rep = Report("Lab: four model families on the same text",
                 "Trained the same number of steps on the same corpus, what do GPT, Llama, BERT and T5 cost "
                 "(parameters, FLOPs per token, throughput), and how does each objective's loss fall?", command)
    rep.table(["family", "objective", "predicts", "params", "train FLOPs/token", "tokens/s (incl. evals)",
               "train FLOPs", "val loss (nats/pred. token)", "val bits/byte"], rows,
              "Tokens are tokens of text (seq_len per row); T5's encoder reads a shorter corrupted copy and "
              "its decoder writes only the spans, so its FLOPs per text token are lower.")
    rep.plot("val_loss_vs_flops", _plot(curves), "validation loss against training FLOPs, per family")
    falls = {f: r["final"]["val_loss"] < r["first_eval"]["val_loss"] for f, r in results.items()}
    verdicts = ", ".join(f"{f} {'yes' if ok else 'NO'}" for f, ok in falls.items())
    rep.text(f"""## What it shows

Every family's validation loss falls over the run: {verdicts}.

The losses are not a ranking. The causal models (GPT, Llama) are scored on every next token
with only the left context; BERT on the 15% of tokens it masked, seeing both sides; T5 on the
spans it must write, after their sentinel. Only the causal models define bits per byte, which
is comparable across tokenizers and with the n-gram baselines of the `pretrain` lab.

FLOPs per token follow 6N + 12·L·d·T for the decoder- and encoder-only models (PaLM, appendix
B); T5's count (ltk/models/t5.py `train_flops`) charges its encoder for the corrupted input and its
decoder only for the targets, which is why span corruption is cheap per token of text
(Raffel et al. 2020, §3.3.4). Llama's SwiGLU and untied head and BERT's extra embedding tables
change N; the attention term is the same shape for all.""")
    rep.results.update({"families": results})
    path = rep.write(out)
    print(f"\nreport: {path}")
    for r in rows:
        print(f"{r[0]:6s} loss {r[7]:.3f}  tokens/s {r[5]:,}  FLOPs/token {r[4]:,}")
    return path


LAB = Lab(
    name="families",
    question="Same text, same steps: what do GPT, Llama, BERT and T5 cost, and how does each objective's loss fall?",
    run=run,
    quick_minutes=3.0,
)
