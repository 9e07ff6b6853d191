"""Hugging Face model folders on disk: `from_pretrained(path)` and `save_pretrained(model, path)`.

A folder holds config.json and the weights in one of the layouts transformers writes:

    model.safetensors                        one file (safetensors: no code runs on load)
    model.safetensors.index.json + shards    {"weight_map": {tensor name: shard file}}
    pytorch_model.bin (+ .index.json)        pickles, loaded with torch.load(weights_only=True)

`architectures` in config.json picks the family and its converter (ltk/models/hf/<family>.py);
the conversion is strict, so a checkpoint that does not fit is refused with the tensors
named — never completed with random weights. A damaged file (config.json that is not JSON, a cut
weights file, an index naming a missing shard) or a pickle holding more than tensors is refused
with its name (the readers are in ltk/models/files.py). A config.json whose model could not fit in
memory (ltk/models/sizing.py) is refused before any tensor is read. A tokenizer.json in the same
folder is loaded by training.tokenizer.Tokenizer.load(path).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ltk.models import bert, gpt, llama, t5
from ltk.models.files import BadFileError, load_safetensors, load_tensors_only, read_json
from ltk.models.hf import bert as hf_bert
from ltk.models.hf import gpt2 as hf_gpt2
from ltk.models.hf import llama as hf_llama
from ltk.models.hf import t5 as hf_t5
from ltk.models.sizing import CHECKPOINT_BYTES, WEIGHT_BYTES, check_fits

# transformers architecture -> (our model class, converter module)
ARCHITECTURES = {
    "GPT2LMHeadModel": (gpt.GPT, hf_gpt2),
    "GPT2Model": (gpt.GPT, hf_gpt2),  # the bare model: our head is the tied embedding, so nothing is invented
    "LlamaForCausalLM": (llama.Llama, hf_llama),
    "BertForMaskedLM": (bert.Bert, hf_bert),
    "BertModel": (bert.Bert, hf_bert),
    "T5ForConditionalGeneration": (t5.T5, hf_t5),
}
_CONVERTER_OF = {gpt.GPT: hf_gpt2, llama.Llama: hf_llama, bert.Bert: hf_bert, t5.T5: hf_t5}


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, whatever the layout (single file, sharded, safetensors or bin)."""
    for index_name, loader in (("model.safetensors.index.json", load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = folder / index_name
        if index.exists():
            tensors: dict[str, torch.Tensor] = {}
            for shard in _shards(index):
                if not (folder / shard).exists():
                    raise FileNotFoundError(f"{index} names shard {shard}, which is missing")
                tensors.update(loader(folder / shard))
            return tensors
    if (folder / "model.safetensors").exists():
        return load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return _load_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"{folder} has no model.safetensors, pytorch_model.bin or an index of shards")


def _shards(index: Path) -> list[str]:
    """The shard files an index names: plain file names in its folder (a path elsewhere is refused)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise BadFileError(f"{index} has no weight_map of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise BadFileError(f"{index} names shard {shard!r}, which is not a file of its folder")
    return shards


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_tensors_only(path)  # tensors only: no code runs
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise BadFileError(f"{path} is not a state dict (tensor name -> tensor)")
    return tensors


def is_hf_folder(path: str | Path) -> bool:
    """A transformers model folder (its config.json names an architecture or model type), as
    opposed to one of our run folders, whose config.json is a run config. A config.json that is
    not valid JSON is an error naming it, whichever kind of folder holds it."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    d = read_json(f, expect=None)
    return isinstance(d, dict) and ("architectures" in d or "model_type" in d)


def from_pretrained(path: str | Path, *, backend: str = "auto") -> torch.nn.Module:
    """A model of ours with the weights of a local transformers folder."""
    model_cls, cfg, tensors = read_folder(path, backend=backend)
    check_fits(cfg, WEIGHT_BYTES, "cpu", where=f"{Path(path) / 'config.json'}: ")  # beside the loaded tensors
    model = model_cls(cfg)
    _load_strict(model, tensors)
    return model.eval()


def read_folder(path: str | Path, *, backend: str = "auto") -> tuple[type, object, dict[str, torch.Tensor]]:
    """(our model class, its config, the checkpoint's tensors under our names) of a folder."""
    model_cls, cfg, conv = read_config(path, backend=backend)
    return model_cls, cfg, conv.state_dict_from_hf(load_tensors(Path(path)), cfg)


def read_config(path: str | Path, *, backend: str = "auto") -> tuple[type, object, object]:
    """(our model class, its config, the converter module) of a folder, no tensor read."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    hf_config = read_json(folder / "config.json")
    archs = hf_config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{folder}: architectures {archs} are not supported; supported: {', '.join(ARCHITECTURES)}")
    model_cls, conv = ARCHITECTURES[arch]
    where = f"{folder / 'config.json'}: "
    try:
        cfg = conv.config_from_hf(hf_config)
        cfg.backend = backend
        cfg.validate()
    except KeyError as e:
        raise ValueError(f"{where}missing field {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}{e}") from None
    # a crafted config (n_layer 1e9) is refused here, before any tensor is read or allocated
    check_fits(cfg, CHECKPOINT_BYTES, "cpu", what="the checkpoint's tensors, 16-bit at the least", where=where)
    return model_cls, cfg, conv


def _load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The converters already checked names and shapes; tied aliases are the only keys allowed
    to be absent here (they are the same tensor as one that is present)."""
    own = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for name, t in own.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    aliases = {n for names in by_storage.values() if any(m in tensors for m in names)
               for n in names if n not in tensors}
    missing = [n for n in own if n not in tensors and n not in aliases]
    unexpected = [n for n in tensors if n not in own]
    if missing or unexpected:
        raise ValueError(f"converted checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict({**{n: own[n] for n in aliases}, **tensors}, strict=True)


def save_pretrained(model: torch.nn.Module, path: str | Path) -> Path:
    """Write config.json + model.safetensors that transformers' from_pretrained loads."""
    conv = _CONVERTER_OF.get(type(model))
    if conv is None:
        raise ValueError(f"save_pretrained supports {', '.join(c.__name__ for c in _CONVERTER_OF)}, "
                         f"not {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = conv.state_dict_to_hf(model.state_dict(), model.config)
    # drop tied aliases (the very same tensor under a second name: transformers re-ties them on
    # load); views that only share a storage (q, k, v cut from one fused matrix) are copied apart,
    # since safetensors refuses tensors that share memory
    seen, unique = set(), {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            unique[name] = t.detach().cpu().clone()
    # each file is written under a temporary name and renamed into place, so an interrupted
    # save never leaves a half-written file where a good one was
    tmp_weights, tmp_config = folder / ".model.safetensors.tmp", folder / ".config.json.tmp"
    save_file(unique, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(conv.config_to_hf(model.config), indent=2))
    os.replace(tmp_weights, folder / "model.safetensors")
    os.replace(tmp_config, folder / "config.json")
    return folder
