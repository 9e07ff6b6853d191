import json

import pytest
import torch

from ltk.models.gpt import GPT, GPTConfig
from ltk.training import checkpoint as ckpt_mod
from ltk.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, restore_model, save_checkpoint


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8))


def _save(run, step, model, **kw):
    return save_checkpoint(run, step, model.state_dict(), {"optimizer": {}, "x": torch.arange(3)},
                           {"step": step}, **kw)


def test_round_trip_restores_tied_weights(tmp_path):
    m = _model(0)
    path = _save(tmp_path, 5, m)
    assert path.name == "step_000005" and (path / "manifest.json").exists()
    ck = load_checkpoint(tmp_path)  # a run folder resolves to its newest checkpoint
    assert "lm_head.weight" not in ck.model  # stored once
    m2 = _model(1)
    restore_model(m2, ck.model)
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert m2.lm_head.weight is m2.wte.weight
    assert ck.state == {"step": 5} and torch.equal(ck.trainer["x"], torch.arange(3))


def test_restore_names_missing_and_mismatched_tensors(tmp_path):
    ck = load_checkpoint(_save(tmp_path, 1, _model()))
    del ck.model["ln_f.weight"]
    ck.model["h.0.attn.c_attn.bias"] = torch.zeros(5)
    ck.model["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        restore_model(_model(), ck.model)
    msg = str(e.value)
    assert "ln_f.weight" in msg and "extra.weight" in msg and "h.0.attn.c_attn.bias" in msg


def test_keep_last_prunes_oldest(tmp_path):
    m = _model()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, m, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_corrupt_checkpoint_is_refused_and_earlier_one_untouched(tmp_path):
    m = _model()
    first = _save(tmp_path, 1, m)
    second = _save(tmp_path, 2, m)
    blob = (second / "model.safetensors").read_bytes()
    (second / "model.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="checksum mismatch.*step_000001"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(first).state == {"step": 1}
    third = _save(tmp_path, 3, m)
    (third / "trainer.pt").write_bytes((third / "trainer.pt").read_bytes()[:10])  # truncated copy
    with pytest.raises(CheckpointError, match="trainer.pt"):
        load_checkpoint(third)


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    m = _model()
    _save(tmp_path, 1, m)

    def crash(*a, **k):
        raise KeyboardInterrupt  # e.g. the user hits Ctrl-C halfway through writing

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, m)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert load_checkpoint(tmp_path).state == {"step": 1}


def test_half_written_folder_without_manifest_is_refused(tmp_path):
    m = _model()
    path = _save(tmp_path, 1, m)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="did not finish"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "checkpoints")


def test_manifest_lists_sizes_and_hashes(tmp_path):
    path = _save(tmp_path, 3, _model(), extra_files={"notes.txt": _write(tmp_path / "n.txt", "hi")})
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "trainer.pt", "state.json", "notes.txt"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())


def _write(p, text):
    p.write_text(text)
    return p
