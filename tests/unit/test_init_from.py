"""`ltk train --init-from`: continued pre-training from a transformers folder or one of our runs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ltk.cli import main
from ltk.training.config import DataConfig
from ltk.training.data import prepare_data
from ltk.training.loader import TokenLoader

COMMON = ["--max-steps", "1", "--trainer.batch_size", "4", "--trainer.eval_batches", "1",
          "--trainer.progress", "false", "--data.min_chars", "16", "--data.val_fraction", "0.1"]


def _first_batch(run_dir):
    """The first training micro-batch of a run, rebuilt from its config (the cached data)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    data = prepare_data(DataConfig(**cfg["data"]), verbose=False)
    t = cfg["trainer"]
    loader = TokenLoader(data.train_files, t["seq_len"] or cfg["model"]["block_size"], t["batch_size"], seed=t["seed"])
    return loader.next_batch()


def _first_loss(run_dir) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_init_from_a_transformers_gpt2_folder_gives_its_loss(hf_gpt2, tiny_corpus, tmp_path, capsys):
    import transformers as tf

    out = tmp_path / "run"
    assert main(["train", "--init-from", str(hf_gpt2), "--data", str(tiny_corpus), "--out", str(out),
                 *COMMON]) == 0
    assert "fresh optimizer, step 0" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_embd"] == 32 and cfg["model"]["vocab_size"] == 305  # the folder's, not the preset's
    assert cfg["data"]["tokenizer"] == str(hf_gpt2)  # the data tokenized with the folder's tokenizer
    x, y = _first_batch(out)
    hf = tf.GPT2LMHeadModel.from_pretrained(hf_gpt2).eval()
    with torch.no_grad():
        logits = hf(x).logits
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert abs(_first_loss(out) - expected) < 1e-5
    assert json.loads((out / "summary.json").read_text())["init_from"] == str(hf_gpt2)


def test_init_from_one_of_our_runs(tiny_base, tiny_corpus, tmp_path):
    from ltk.models import GPT, GPTConfig
    from ltk.training.checkpoint import full_model_state, read_state, resolve_checkpoint, restore_model
    from ltk.training.sharded_checkpoint import consolidated_trainer_state

    out = tmp_path / "run"
    assert main(["train", "--init-from", str(tiny_base), "--data", str(tiny_corpus), "--out", str(out),
                 *COMMON]) == 0
    ckpt, state = read_state(tiny_base)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == state["config"]["model"] and cfg["data"]["tokenizer"] == str(ckpt / "tokenizer.json")
    model = GPT(GPTConfig(**cfg["model"]))
    restore_model(model, full_model_state(tiny_base))
    x, y = _first_batch(out)
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten()).item()
    assert abs(_first_loss(out) - expected) < 1e-5
    # not a resume: step 1 after one step, Adam's moments one step old (the base's were 4)
    mine = resolve_checkpoint(out)
    assert json.loads((mine / "state.json").read_text())["step"] == 1
    moments = consolidated_trainer_state(mine)["optimizer"]["state"]
    assert {float(st["step"]) for st in moments.values()} == {1.0}


@pytest.mark.parametrize("extra, needle", [
    (["--resume", "RUN"], "give one"),
    (["--model.n_layer", "3"], "--model.n_layer 3 contradicts"),
    (["--preset", "llama-debug"], "holds a gpt model but --preset llama-debug trains a llama one"),
])
def test_init_from_refusals(hf_gpt2, tiny_base, extra, needle, tmp_path, capsys):
    extra = [str(tiny_base) if a == "RUN" else a for a in extra]
    assert main(["train", "--init-from", str(hf_gpt2), "--out", str(tmp_path / "r"), *extra, *COMMON]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_init_from_a_folder_that_is_neither(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["train", "--init-from", str(tmp_path / "x"), "--max-steps", "1"]) == 2
    assert "neither a Hugging Face model folder" in capsys.readouterr().err
