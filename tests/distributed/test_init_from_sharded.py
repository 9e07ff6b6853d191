"""`--init-from` under the engines that build the model on the meta device (ZeRO-3, FSDP2): each
rank loads only its shard of a transformers folder's (or one of our checkpoints') weights, and
the run equals the same run on one process — the first loss is the source model's own."""
import json

import pytest

from ltk.parallel.dist import spawn
from ltk.training.init_from import adopt_init_source, read_init_source
from ltk.training.presets import get_preset
from ltk.training.trainer import Trainer

TIMEOUT = 300


def _config(corpus, out, source, strategy="auto"):
    cfg = get_preset("gpt-debug")
    adopt_init_source(cfg, read_init_source(source))
    cfg.data.source, cfg.data.min_chars, cfg.data.val_fraction = str(corpus), 16, 0.1
    t = cfg.trainer
    t.max_steps, t.batch_size, t.eval_every, t.eval_batches, t.log_every = 2, 4, 2, 2, 1
    t.out_dir, t.progress, t.seed, t.seq_len = str(out), False, 7, 32
    cfg.model.backend, cfg.parallel.strategy = "torch", strategy
    return cfg


def init_jobs(rank, world, jobs):
    """Worker: each (config, source) trained in turn, initialized from the source."""
    for cfg, source in jobs:
        Trainer(cfg, init_from=read_init_source(source)).fit()


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows] + [rows[-1]["val_loss"]]


def test_zero3_and_fsdp2_load_their_shards_of_the_source(hf_gpt2, tiny_base, tiny_corpus, tmp_path):
    runs = {f"{s}-{n}": (s, src) for s in ("zero3", "fsdp2") for n, src in (("hf", hf_gpt2), ("ours", tiny_base))}
    spawn(init_jobs, 1, [(_config(tiny_corpus, tmp_path / f"single-{n}", src), src)
                         for n, src in (("hf", hf_gpt2), ("ours", tiny_base))], timeout_s=TIMEOUT)
    spawn(init_jobs, 2, [(_config(tiny_corpus, tmp_path / name, src, s), src) for name, (s, src) in runs.items()],
          timeout_s=TIMEOUT)
    for name in runs:
        single = _losses(tmp_path / f"single-{name.split('-')[1]}")
        assert _losses(tmp_path / name) == pytest.approx(single, rel=1e-5, abs=1e-5), name
