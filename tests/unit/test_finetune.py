"""`ltk finetune` end to end on a tiny base: full, LoRA and QLoRA train only what they should,
write what they say (PEFT adapter, merged Hugging Face folder), and the merged folder gives the
fine-tuned model's logits; data from a JSONL file works as well as the built-in task."""
import json

import pytest
import torch

from ltk.cli import main
from ltk.training.base_model import load_base
from ltk.training.finetune import FinetuneConfig, run_finetune


def _cfg(base, out, method, **kw):
    return FinetuneConfig(method=method, base=str(base), data=kw.pop("data", "builtin"), out_dir=str(out), steps=3,
                          batch_size=4, max_len=96, limit=40, eval_every=3, eval_examples=4, device="cpu", **kw)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_method_trains_what_it_should_and_writes_its_outputs(tiny_base, tmp_path, method, monkeypatch):
    monkeypatch.setenv("LTK_PLOT", "1")  # off elsewhere in the suite (tests/conftest.py)
    before, _, _ = load_base(tiny_base, torch.device("cpu"))
    s = run_finetune(_cfg(tiny_base, tmp_path / method, method, merge=True))
    if method == "full":
        assert s["trainable_params"] == s["params"]
    assert 0.0 <= s["after"]["exact_match"] <= 1.0 and s["after"]["val_loss"] > 0
    m = s["memory"]
    # Adam: two moments per trainable element (+ a 4-byte step counter per tensor)
    assert m["gradients"] > 0 and 0 <= m["optimizer_states"] - 2 * m["gradients"] <= 4 * 64 and m["activations"] > 0
    assert (tmp_path / method / "loss.png").exists()
    if method != "full":
        assert s["trainable_params"] < s["params"] / 4
        assert (tmp_path / method / "adapter" / "adapter_config.json").exists()
    if method == "qlora":
        assert m["base_nf4_packed"] > 0
    folder = tmp_path / method / ("model" if method == "full" else "merged")
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    merged, _, family = load_base(folder, torch.device("cpu"))
    assert family == "gpt"
    changed = any((a - b).abs().max() > 0 for a, b in zip(merged.state_dict().values(), before.state_dict().values()))
    assert changed  # the update is in the merged weights


def test_jsonl_data_and_the_command_line(tiny_base, tmp_path, capsys):
    words = ("alpha", "beta", "gamma", "delta")
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in words] * 5
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    rc = main(["finetune", "--method", "lora", "--base", str(tiny_base), "--data", str(data), "--steps", "2",
               "--batch-size", "4", "--max-len", "64", "--eval-every", "2", "--out", str(tmp_path / "ft"),
               "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lora:" in out and "val_ppl" in out
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert "exact_match" not in summary["after"] and summary["after"]["val_ppl"] > 1


def test_bad_input_is_named(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="--method"):
        run_finetune(_cfg(tiny_base, tmp_path / "x", "prefix-tuning"))
    with pytest.raises(ValueError, match="--base is required"):
        run_finetune(FinetuneConfig(base=""))


def test_finetune_lab_compares_the_three_methods(tiny_base, tmp_path, monkeypatch):
    from ltk.labs import finetune

    monkeypatch.setattr(finetune, "lab_settings", lambda quick: dict(pretrain_steps=0, steps=2, batch=4,
                                                                      eval_examples=4, limit=40, max_len=96))
    # the rows on several ranks launch processes (torchrun): ltk/parallel/plan_finetune.py's test measures
    # 2 ddp ranks against the plan, cheaper; here the single-process rows only
    monkeypatch.setattr(finetune, "PARALLEL", ())
    report = finetune.run(tmp_path / "lab", quick=True, base=str(tiny_base))
    results = json.loads((tmp_path / "lab" / "results.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["full", "lora", "qlora"] and results["parallel"] == {}
    full, lora, qlora = (rows[m] for m in ("full", "lora", "qlora"))
    # the plan (ltk plan --method) is exact: weights, gradients and optimizer states, byte for byte
    for r in rows.values():
        assert {k: r["measured"][k] for k in ("weights", "gradients", "optimizer")} == \
               {k: r["predicted"][k] for k in ("weights", "gradients", "optimizer")}
    assert lora["measured"]["gradients"] < full["measured"]["gradients"] / 4
    assert qlora["measured"]["weights"] < lora["measured"]["weights"]
    assert (tmp_path / "lab" / "memory.png").exists() and "QLoRA" in report.read_text()
