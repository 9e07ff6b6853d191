"""`ltk export --hf` (ltk/training/export_hf.py): the streamed export, one tensor at a time, writes
exactly the tensors that save_pretrained writes from the whole model, for every family; the
folder loads in transformers with our logits. (A sharded checkpoint's export: in
tests/distributed/test_sharded_checkpoint.py.)"""
import json
import weakref

import pytest
import torch

from ltk.cli import main
from ltk.models import get_family
from ltk.models.files import load_safetensors
from ltk.models.hf.folder import save_pretrained
from ltk.training.checkpoint import save_checkpoint
from ltk.training.export_hf import export_hf
from ltk.training.presets import get_preset


def _run(tmp_path, preset):
    """A run folder with one consolidated checkpoint of a random model of `preset` (vocabulary 99)."""
    cfg = get_preset(preset)
    cfg.model.vocab_size = 99
    if cfg.family == "gpt":
        cfg.model.bias = True  # transformers' GPT-2 always has biases
    if cfg.family == "llama":
        cfg.model.tie_embeddings = False
    torch.manual_seed(0)
    model = get_family(cfg.family).model_cls(cfg.model).eval()
    save_checkpoint(tmp_path / "run", 1, model.state_dict(), {"optimizer": {}},
                    {"step": 1, "config": cfg.to_dict()})
    return model, tmp_path / "run"


@pytest.mark.parametrize("preset", ["gpt-debug", "llama-debug", "bert-debug", "t5-debug"])
def test_streamed_export_writes_what_save_pretrained_writes(tmp_path, preset):
    model, run = _run(tmp_path, preset)
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    save_pretrained(model, tmp_path / "whole")
    a = load_safetensors(tmp_path / "hf" / "model.safetensors")
    b = load_safetensors(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ours, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "whole"))
    assert ours.pop("torch_dtype") == "float32" and ours == theirs


def test_exported_llama_loads_in_transformers_with_our_logits(tmp_path):
    tf = pytest.importorskip("transformers")
    model, run = _run(tmp_path, "llama-debug")
    hf = tf.LlamaForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf"), local_files_only=True).eval()
    ids = torch.randint(0, 99, (2, 11))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-5
    half = load_safetensors(export_hf(run, tmp_path / "bf16", dtype="bf16") / "model.safetensors")
    assert torch.equal(half["lm_head.weight"], model.output.weight.detach().to(torch.bfloat16))


def test_export_refuses_what_it_cannot_write_by_name(tmp_path, capsys):
    """Not a checkpoint, or an output folder holding weights of another layout (loaders would read
    those instead): exit code 2 with the file named, nothing written."""
    _, run = _run(tmp_path, "gpt-debug")
    assert main(["export", str(tmp_path / "nowhere"), "--hf", str(tmp_path / "hf")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text("{}")
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 2
    assert "already holds model.safetensors.index.json" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Each tensor of ours is read once, alone, and is freed before the one after the next is read
    (the writer may still hold the last output while it asks for the next): never the whole model."""
    from ltk.training import sharded_checkpoint

    model, run = _run(tmp_path, "gpt-debug")
    read, alive = [], []
    original = sharded_checkpoint.ConsolidatedReader.read

    def spy(self, name, kind="param", offsets=None, sizes=None):
        alive.append(sum(r() is not None for r in read))  # earlier tensors still in memory
        t = original(self, name, kind, offsets, sizes)
        read.append(weakref.ref(t))
        return t

    monkeypatch.setattr(sharded_checkpoint.ConsolidatedReader, "read", spy)
    export_hf(run, tmp_path / "hf")
    assert len(read) == len(dict(model.named_parameters())) > 10
    assert max(alive) <= 1
