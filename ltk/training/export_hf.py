"""`ltk export RUN_OR_CKPT --hf OUT`: a checkpoint of ours (sharded or consolidated) as a Hugging Face
folder, on one process, one tensor at a time.

    OUT/config.json         the family's transformers config (ltk/models/hf/<family>.py config_to_hf)
    OUT/model.safetensors   every tensor under transformers' names, one file built incrementally
    OUT/tokenizer.json      the run's tokenizer (ltk generate and ltk finetune read it from the folder)

Streaming: the converters (state_dict_to_hf) take a whole state dict, so they are run on the
model's shapes alone — meta tensors, no memory — once per tensor of ours, that tensor marked
by a dtype of its own (float64): the outputs in that dtype are the ones it produces. That plan
gives every name, shape and byte offset of the output, so the safetensors header is written
first (ltk/training/safetensors_stream.py); then, for each tensor of ours in turn, its chunks
are read (ltk/training/sharded_checkpoint.py: only that tensor's boxes), it is converted with
the others still meta, and its outputs are written and dropped. Peak memory: one tensor and
what the converter makes of it, never the model. One file rather than HF's shards with an
index: the file is written once, front to back, whatever its size. Tied aliases a converter
emits (GPT-2's lm_head.weight = transformer.wte.weight) are written once; transformers
re-ties them on load, as for the folders `save_pretrained` writes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ltk.models.files import read_json
from ltk.training.checkpoint import CheckpointError, read_manifest, resolve_checkpoint, verify_file
from ltk.training.safetensors_stream import write_streamed

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# weights files of the layouts transformers writes besides one model.safetensors (ltk/models/hf/folder.py)
_OTHER_LAYOUTS = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_MARK = torch.float64  # the dtype that tells one tensor's outputs apart in the plan


def _outputs(conv, tensors: dict, cfg, source: str, mark: torch.dtype | None) -> list[tuple[str, torch.Tensor]]:
    """The converter's outputs that `source` produces (each distinct tensor once)."""
    with torch.no_grad():
        try:
            out = conv.state_dict_to_hf(tensors, cfg)
        except (RuntimeError, NotImplementedError) as e:  # a real tensor met a meta one in an op
            raise ValueError(f"the {conv.__name__} converter combines {source} with other tensors; "
                             f"it cannot be exported one tensor at a time ({e})") from None
    seen, mine = set(), []
    for name, t in out.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if (t.dtype == mark) if mark is not None else not t.is_meta:
            mine.append((name, t))
    return mine


def export_hf(src: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the Hugging Face folder `out` from checkpoint (or run folder) `src`; returns `out`."""
    from ltk.models import get_family
    from ltk.models.hf.folder import _CONVERTER_OF
    from ltk.training.config_file import config_from_dict
    from ltk.training.sharded_checkpoint import open_reader

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    path = resolve_checkpoint(src)
    verify_file(path, "state.json", read_manifest(path).get("state.json", {"bytes": -1}))
    cfg = config_from_dict(read_json(path / "state.json")["config"], path / "state.json")
    model_cls = get_family(cfg.family).model_cls
    conv = _CONVERTER_OF.get(model_cls)
    if conv is None:
        raise ValueError(f"no Hugging Face converter for the {cfg.family} family")
    hf_config = {**conv.config_to_hf(cfg.model), "torch_dtype": str(EXPORT_DTYPES[dtype])[6:]}
    with torch.device("meta"):
        meta = dict(model_cls(cfg.model).named_parameters())  # a tied weight once, under its first name
    folder = Path(out)
    stale = [n for n in _OTHER_LAYOUTS if (folder / n).exists()]
    if stale:  # loaders would read those instead of (or mixed with) the model.safetensors written here
        raise ValueError(f"{folder} already holds {', '.join(stale)}, weights in another layout; "
                         "remove them or export to another folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_config = folder / ".model.safetensors.tmp", folder / ".config.json.tmp"
    with open_reader(path) as reader:
        missing = [n for n in meta if n not in reader.names()]
        unexpected = [n for n in reader.names() if n not in meta]
        wrong = [n for n in meta if n in reader.names() and reader.shape(n) != tuple(meta[n].shape)]
        if missing or unexpected or wrong:
            raise CheckpointError(f"{path} does not fit its own config: missing {missing[:8]}, unexpected "
                                  f"{unexpected[:8]}, other shapes {wrong[:8]}")
        entries, current = [], {}

        def produce(source: str, name: str) -> torch.Tensor:
            if current.get("source") != source:  # read and convert one tensor of ours
                current.clear()
                real = reader.read(source)
                current.update(source=source, outs=dict(_outputs(conv, {**meta, source: real}, cfg.model,
                                                                 source, None)))
            return current["outs"][name].to(EXPORT_DTYPES[dtype])

        for source, p in meta.items():
            probe = {**meta, source: torch.empty(p.shape, dtype=_MARK, device="meta")}
            for name, t in _outputs(conv, probe, cfg.model, source, _MARK):
                entries.append((name, EXPORT_DTYPES[dtype], tuple(t.shape),
                                lambda s=source, n=name: produce(s, n)))
        with torch.no_grad():  # every output traced to one tensor of ours, or the plan is wrong
            every = conv.state_dict_to_hf(dict(meta), cfg.model)
        distinct = list({id(t): n for n, t in reversed(every.items())}.values())
        if sorted(distinct) != sorted(n for n, *_ in entries):
            raise ValueError(f"the {conv.__name__} converter makes tensors no single tensor of ours produces")
        try:
            write_streamed(tmp_weights, entries, metadata={"format": "pt"})
        except BaseException:
            tmp_weights.unlink(missing_ok=True)
            raise
    tmp_config.write_text(json.dumps(hf_config, indent=2))
    os.replace(tmp_weights, folder / "model.safetensors")
    os.replace(tmp_config, folder / "config.json")
    if (path / "tokenizer.json").exists():
        shutil.copyfile(path / "tokenizer.json", folder / "tokenizer.json")
    return folder
