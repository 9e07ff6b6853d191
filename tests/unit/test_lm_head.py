"""The zoo's LM heads score their own targets (ltk/models/lm_head.py): `model.loss full` is bit
for bit the loss the objectives computed from the logits before, `fused` (the chunked fused
linear cross-entropy, no (B·T, V) logits) equals it within the fp32 budget in the loss and every
gradient, for each family and its objective, and a run trained with the fused loss follows the
full one."""
import json

import pytest
import torch
import torch.nn.functional as F

from ltk.cli import main
from ltk.models import get_family
from ltk.models.lm_head import resolve_loss
from ltk.training.objectives import objective_for, step_generator
from ltk.training.presets import get_preset

V = 301  # odd: no chunk or tile divides it


def _model(preset: str, loss: str):
    cfg = get_preset(preset)
    cfg.model.vocab_size, cfg.model.loss, cfg.model.backend = V, loss, "torch"
    torch.manual_seed(0)
    return get_family(cfg.family).model_cls(cfg.model), cfg.family


def _batch(family: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V - 101, (3, 17), generator=g)  # room for T5's sentinels and BERT's [MASK]
    return x, torch.roll(x, -1, dims=1)


def _loss_and_grads(model, family, x, y):
    obj = objective_for(family, V - (101 if family == "t5" else 1 if family == "bert" else 0), 0)
    model.zero_grad()
    loss = obj.loss(model, x, y, step_generator(0, 0, 0, 0))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["gpt-debug", "llama-debug", "bert-debug", "t5-debug"])
def test_full_head_loss_is_the_logits_loss_bit_for_bit(preset):
    model, family = _model(preset, "full")
    x, y = _batch(family)
    if family in ("gpt", "llama"):
        logits = model(x)
        ref = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
        assert torch.equal(model(x, targets=y), ref)
    else:  # the objective's own (logits, labels), scored as before
        obj = objective_for(family, V - (101 if family == "t5" else 1), 0)
        logits, labels = obj.forward(model, x, step_generator(0, 0, 0, 0))
        ref = F.cross_entropy(logits.float().view(-1, V), labels.view(-1), ignore_index=-100)
        assert torch.equal(obj.loss(model, x, y, step_generator(0, 0, 0, 0)), ref)


@pytest.mark.parametrize("preset", ["gpt-debug", "llama-debug", "bert-debug", "t5-debug"])
def test_fused_head_loss_equals_full_in_loss_and_every_gradient(preset):
    full, family = _model(preset, "full")
    fused, _ = _model(preset, "fused")
    fused.load_state_dict(full.state_dict())
    x, y = _batch(family)
    l_full, g_full = _loss_and_grads(full, family, x, y)
    l_fused, g_fused = _loss_and_grads(fused, family, x, y)
    torch.testing.assert_close(l_fused, l_full, rtol=1e-5, atol=1e-6)
    assert g_full.keys() == g_fused.keys()
    for n in g_full:
        torch.testing.assert_close(g_fused[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_auto_is_fused_only_where_the_kernels_are_triton():
    h = torch.zeros(2, 3)
    assert resolve_loss("auto", "torch", h) == "full" and resolve_loss("auto", "auto", h) == "full"
    assert resolve_loss("fused", "torch", h) == "fused"
    with pytest.raises(ValueError, match="model.loss must be one of"):
        resolve_loss("chunked", "torch", h)


def test_targets_must_match_the_hidden_states():
    model, _ = _model("gpt-debug", "full")
    x, y = _batch("gpt")
    with pytest.raises(ValueError, match="do not match the hidden states"):
        model(x, targets=y[:, :-1])


def test_training_with_the_fused_loss_follows_the_full_one(tiny_corpus, tmp_path):
    def run(loss):
        out = tmp_path / loss
        argv = ["train", "--preset", "gpt-debug", "--data", str(tiny_corpus), "--out", str(out), "--max-steps", "12",
                "--data.vocab_size", "300", "--data.min_chars", "16", "--trainer.batch_size", "4",
                "--trainer.seq_len", "32", "--trainer.eval_every", "0", "--trainer.eval_batches", "1",
                "--trainer.log_every", "1", "--trainer.progress", "false", "--optim.warmup_steps", "3",
                "--model.loss", loss, "--model.backend", "torch"]
        assert main(argv) == 0
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    full, fused = run("full"), run("fused")
    assert len(full) == len(fused) == 12
    assert max(abs(a - b) for a, b in zip(full, fused)) <= 1e-5, (full, fused)


@pytest.mark.parametrize("layout, words", [(dict(tp=2), "vocab-parallel"), (dict(pp=2), "last stage")])
def test_fused_loss_is_refused_where_the_head_does_not_score(layout, words):
    from ltk.training.config import ConfigError
    from ltk.training.config_check import check_run

    cfg = get_preset("gpt-debug")
    cfg.model.loss = "fused"
    for k, v in layout.items():
        setattr(cfg.parallel, k, v)
    with pytest.raises(ConfigError, match=words):
        check_run(cfg, world=2, size=False, warn=False)
