"""Damaged or unsafe files in Hugging Face folders and in our checkpoints are refused with one
line that names the file: a truncated safetensors or .bin file, an index naming a missing shard,
a config.json that is not JSON (with its line and column), and a pickle holding objects other
than tensors (never loaded, and never with advice to load it with weights_only=False)."""
import json

import pytest
import torch

from ltk.cli import main
from ltk.models import from_pretrained
from ltk.models.files import BadFileError, UnsafePickleError, load_tensors_only, read_json
from ltk.models.gpt import GPT, GPTConfig
from ltk.training import checkpoint as ckpt_mod
from ltk.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

tf = pytest.importorskip("transformers")


def _hf_folder(path, **save_kw):
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    hf.save_pretrained(path, **save_kw)
    return path


def _bin_folder(path):
    """A folder with pytorch_model.bin, as transformers 4 wrote by default (5 writes only safetensors)."""
    from safetensors.torch import load_file

    folder = _hf_folder(path)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    from_pretrained(folder)  # loads while intact
    return folder


def _cut(path):
    """Keep the first half of a file, as an interrupted download or copy does."""
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


class _Payload:
    """Unpickling this creates `marker`: the code a malicious pickle would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = _hf_folder(tmp_path)
    _cut(folder / "model.safetensors")
    with pytest.raises(BadFileError, match=r"model\.safetensors is truncated or corrupt: "):
        from_pretrained(folder)


def test_truncated_shard_names_the_shard(tmp_path):
    folder = _hf_folder(tmp_path, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    _cut(shard)
    with pytest.raises(BadFileError, match=rf"{shard.name} is truncated or corrupt"):
        from_pretrained(folder)


@pytest.mark.parametrize("damage", ["cut", "garbage", "empty"])
def test_truncated_or_invalid_bin_names_the_file(damage, tmp_path):
    folder = _bin_folder(tmp_path)
    f = folder / "pytorch_model.bin"
    if damage == "cut":
        _cut(f)
    else:
        f.write_bytes(b"not a checkpoint " * 8 if damage == "garbage" else b"")
    with pytest.raises(BadFileError, match=r"pytorch_model\.bin is truncated or corrupt: ") as e:
        from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_truncated_legacy_bin_names_the_file(tmp_path):
    f = tmp_path / "legacy.bin"
    torch.save({"w": torch.randn(50, 10)}, f, _use_new_zipfile_serialization=False)
    _cut(f)
    with pytest.raises(BadFileError, match=r"legacy\.bin is truncated or corrupt"):
        load_tensors_only(f)


def test_index_naming_a_missing_or_foreign_shard(tmp_path):
    folder = _hf_folder(tmp_path, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json names shard {shard.name}, "
                                                r"which is missing"):
        from_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(BadFileError, match=r"index\.json names shard '\.\./elsewhere\.safetensors', which is not"):
        from_pretrained(folder)
    index.write_text('{"weight_map": {"a": "x.safetensors",}}')
    with pytest.raises(BadFileError, match=r"index\.json is not valid JSON: .* at line 1, column 38"):
        from_pretrained(folder)


def test_bad_config_json_names_file_line_and_column(tmp_path):
    folder = _hf_folder(tmp_path)
    good = (folder / "config.json").read_text()
    (folder / "config.json").write_text(good.replace("{", '{\n  "n_layer" 2,', 1))  # a colon left out
    with pytest.raises(BadFileError) as e:
        from_pretrained(folder)
    msg = str(e.value)
    assert msg == f"{folder / 'config.json'} is not valid JSON: Expecting ':' delimiter at line 2, column 13", msg
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(BadFileError, match=r"config\.json: expected a JSON object, got list"):
        from_pretrained(folder)
    (folder / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(BadFileError, match=r"config\.json is not valid JSON: not UTF-8"):
        from_pretrained(folder)


def test_read_json_position_is_exact(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{\n  "a": 1,\n  "b": }\n')
    with pytest.raises(BadFileError, match=rf"^{f} is not valid JSON: Expecting value at line 3, column 8$"):
        read_json(f)


def test_pickle_with_objects_other_than_tensors_is_refused_unrun(tmp_path):
    folder = _bin_folder(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError) as e:
        from_pretrained(folder)
    msg = str(e.value)
    assert str(folder / "pytorch_model.bin") in msg and "objects other than tensors" in msg and "open" in msg
    assert "not loaded" in msg and "safetensors" in msg
    assert "weights_only" not in msg and "\n" not in msg  # none of torch's advice to run the pickle
    assert not marker.exists()
    assert isinstance(e.value, ValueError)  # the CLI answers exit 2


def _checkpoint(run):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8))
    return save_checkpoint(run, 1, model.state_dict(), {"optimizer": {}}, {"step": 1, "config": {}})


def _rehash(path):
    """Rewrite the manifest to match the files, as a crafted checkpoint would."""
    m = json.loads((path / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": ckpt_mod._sha256(path / name), "bytes": (path / name).stat().st_size}
    (path / "manifest.json").write_text(json.dumps(m))


def test_checkpoint_with_an_unsafe_pickle_is_refused_unrun(tmp_path):
    path = _checkpoint(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"optimizer": _Payload(marker)}, path / "trainer.pt")
    _rehash(path)
    with pytest.raises(UnsafePickleError, match=r"trainer\.pt holds objects other than tensors") as e:
        load_checkpoint(tmp_path)
    assert "weights_only" not in str(e.value) and not marker.exists()


def test_checkpoint_with_bad_json_names_the_file(tmp_path):
    path = _checkpoint(tmp_path)
    (path / "state.json").write_text('{"step": 1,\n "config": {,}}')
    _rehash(path)
    with pytest.raises(BadFileError, match=r"state\.json is not valid JSON: .* at line 2, column 13"):
        load_checkpoint(tmp_path)
    (path / "manifest.json").write_text('{"files": ')
    with pytest.raises(CheckpointError, match=r"manifest\.json is not valid JSON: .* at line 1, column 11"):
        load_checkpoint(tmp_path)


def test_cli_names_a_bad_config_json(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]\n "n_layer": 2}')
    assert main(["generate", "--ckpt", str(folder), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'} is not valid JSON" in err and "line 2, column 2" in err, err


def test_cli_resume_names_a_damaged_state_json(tmp_path, capsys):
    path = _checkpoint(tmp_path)
    (path / "state.json").write_text("{")
    _rehash(path)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "state.json is not valid JSON" in err and "line 1, column 2" in err, err


def test_finetune_base_with_bad_config_json_is_named(tmp_path):
    from ltk.training.base_model import load_base

    folder = _hf_folder(tmp_path)
    (folder / "config.json").write_text("{oops}")
    with pytest.raises(BadFileError, match=r"config\.json is not valid JSON: .* line 1, column 2"):
        load_base(folder, torch.device("cpu"))
