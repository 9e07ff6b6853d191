"""Fine-tuning runs through the Trainer: N steps + resume + N steps == 2N steps bit for bit, for
full fine-tuning, LoRA and QLoRA; an adapter checkpoint holds the adapters and their Adam moments
only (the frozen base referenced by path and checksums), and a changed base is refused."""
import json

import pytest
import torch

from ltk.cli import main
from ltk.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ltk.training.finetune import FinetuneConfig, run_finetune


@pytest.fixture(scope="module")
def data(uneven_rows):
    return uneven_rows


def _cfg(base, out, method, steps, data, **kw):
    return FinetuneConfig(method=method, base=str(base), data=data, out_dir=str(out), steps=steps, batch_size=4,
                          max_len=96, eval_every=0, warmup_steps=2, device="cpu", **kw)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_n_plus_resume_plus_n_equals_2n_bit_for_bit(tiny_base, tmp_path, method, data):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_finetune(_cfg(tiny_base, whole, method, 4, data, grad_accum=2, packing=True))
    run_finetune(_cfg(tiny_base, split, method, 2, data, grad_accum=2, packing=True))
    if method == "lora":  # the checkpoint holds the whole run config: `ltk train --resume` continues it too
        assert main(["train", "--resume", str(split), "--max-steps", "4"]) == 0
        resumed = json.loads((split / "summary.json").read_text())
    else:
        resumed = run_finetune(_cfg(tiny_base, split, method, 4, data, grad_accum=2, packing=True), resume=str(split))
    assert _losses(split) == _losses(whole) and len(_losses(whole)) == 4
    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a.state["step"] == b.state["step"] == 4
    assert a.model.keys() == b.model.keys()
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    for name, st in a.trainer["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b.trainer["optimizer"]["state"][name][k]), (name, k)
    assert resumed["before"] == json.loads((whole / "summary.json").read_text())["before"]  # kept in the checkpoint
    if method == "qlora":  # `ltk finetune` writes the adapter folder from the resumed run's weights
        ours = (split / "adapter" / "adapter_model.safetensors").read_bytes()
        assert ours == (whole / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_lora_checkpoint_holds_the_adapters_and_their_moments_only(tiny_base, tmp_path, data):
    s = run_finetune(_cfg(tiny_base, tmp_path / "ft", "lora", 1, data))
    ckpt = load_checkpoint(tmp_path / "ft")
    names = set(ckpt.model)
    assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
    adapters = sum(t.numel() for t in ckpt.model.values())
    assert adapters == s["trainable_params"]
    weights = (ckpt.path / "model.safetensors").stat().st_size
    optimizer = (ckpt.path / "trainer.pt").stat().st_size
    # fp32 weights + two fp32 moments; the files add headers and the RNG states (a few KiB)
    assert 4 * adapters <= weights <= 4 * adapters + 16_384
    assert 8 * adapters <= optimizer <= 8 * adapters + 64_000
    base = (load_checkpoint(tiny_base).path / "model.safetensors").stat().st_size
    assert weights < base / 4
    ref = ckpt.state["base"]
    assert ref["files"]["model.safetensors"]["bytes"] == base


def test_resuming_adapters_on_a_changed_base_is_refused(tiny_base, tmp_path, data):
    import shutil

    from safetensors.torch import load_file, save_file

    from ltk.training.checkpoint import _sha256

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    run_finetune(_cfg(base, tmp_path / "ft", "lora", 1, data))
    step = list_checkpoints(base)[-1]
    weights = load_file(step / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.5  # as if the base were trained on, its manifest rewritten to match
    save_file(weights, step / "model.safetensors")
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": _sha256(step / "model.safetensors"),
                                              "bytes": (step / "model.safetensors").stat().st_size}
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.safetensors changed"):
        run_finetune(_cfg(base, tmp_path / "ft", "lora", 2, data), resume=str(tmp_path / "ft"))
