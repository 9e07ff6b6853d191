"""Shared test set-up: an isolated dataset cache, the Triton interpreter on CPU, and a
tiny corpus + run config that trains in a second."""
from __future__ import annotations

import os

# Triton kernels run in the interpreter on a CPU; this must be set before they are imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# loss.png costs every tiny run about a second (matplotlib); the tests of the plot turn it back on
os.environ.setdefault("LTK_PLOT", "0")

import random
from pathlib import Path

import pytest

from ltk.models.gpt import GPTConfig
from ltk.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig

# Several test workers (pytest-xdist) share the cores: torch's intra-op threads split them, so
# OpenMP threads do not spin against another worker's (a 3x slowdown of the matmul-heavy tests)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Prepared datasets go to a per-session folder, never to the user's ~/.cache."""
    old = os.environ.get("LTK_CACHE")
    os.environ["LTK_CACHE"] = str(tmp_path_factory.mktemp("ltk-cache"))
    yield
    if old is None:
        os.environ.pop("LTK_CACHE", None)
    else:
        os.environ["LTK_CACHE"] = old


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega def return class import for while if else").split()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder of 60 small synthetic documents (deterministic)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(60):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(6, 14))]
        (root / f"doc_{i:03d}.txt").write_text(f"document {i}\n" + "\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_config(tiny_corpus, tmp_path):
    """Factory: a 2-layer, 32-wide GPT on the tiny corpus (a step takes milliseconds);
    keyword arguments override TrainerConfig fields."""

    def make(out_dir: Path | None = None, **trainer) -> RunConfig:
        return _tiny_run_config(tiny_corpus, out_dir or tmp_path / "run", **trainer)

    return make


def _tiny_run_config(corpus: Path, out_dir: Path, **trainer) -> RunConfig:
    t = dict(max_steps=6, batch_size=4, eval_every=3, eval_batches=2, log_every=1, out_dir=str(out_dir),
             progress=False, seed=7)
    t.update(trainer)
    return RunConfig(
        name="tiny",
        model=GPTConfig(vocab_size=0, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1),
        data=DataConfig(source=str(corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=20),
        trainer=TrainerConfig(**t),
    )


@pytest.fixture(scope="session")
def tiny_base(tiny_corpus, tmp_path_factory):
    """A fine-tuning base: a 2-layer, 32-wide GPT pre-trained for 4 steps on the tiny corpus
    (a run folder with its checkpoint and tokenizer), trained once for the session."""
    from ltk.training.trainer import Trainer

    out = tmp_path_factory.mktemp("base")
    Trainer(RunConfig(
        name="tiny", model=GPTConfig(vocab_size=0, block_size=96, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        data=DataConfig(source=str(tiny_corpus), vocab_size=300, min_chars=16, val_fraction=0.1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        trainer=TrainerConfig(max_steps=4, batch_size=4, eval_every=4, eval_batches=2, out_dir=str(out),
                              progress=False),
    )).fit()
    return out


@pytest.fixture(scope="session")
def uneven_rows(tmp_path_factory) -> str:
    """Alpaca rows of uneven length (1 to 8 words, 3 of each): ranks and micro-batches see
    different numbers of response tokens; no exact match to score (the response loss is)."""
    import json

    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "Repeat the words.", "input": " ".join(words[:k]),
                                          "output": " ".join(words[:k])}) for k in range(1, 9) for _ in range(3)))
    return str(path)


@pytest.fixture(scope="session")
def hf_gpt2(tiny_corpus, tmp_path_factory):
    """A transformers GPT-2 folder written from random weights (a config, no download; no dropout),
    2 layers, 32 wide, 32 positions, with a byte-level BPE tokenizer.json trained on the tiny corpus."""
    tf = pytest.importorskip("transformers")
    import torch

    from ltk.training.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("hf-gpt2")
    tok = Tokenizer.train_bpe([p.read_text() for p in sorted(tiny_corpus.iterdir())], 300)
    tok.save(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = tf.GPT2Config(vocab_size=tok.vocab_size + 5, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        tf.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder
