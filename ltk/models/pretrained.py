"""Hugging Face folders as methods of every model: `GPT.from_pretrained(path)` and
`model.save_pretrained(path)` (the functions live in ltk/models/hf/folder.py)."""
from __future__ import annotations

from pathlib import Path


class Pretrained:
    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json + model.safetensors that transformers' from_pretrained loads."""
        from ltk.models.hf.folder import save_pretrained  # the converters import the model files

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backend: str = "auto"):
        """Load a local Hugging Face folder; it must hold this family (models.from_pretrained
        picks the family itself)."""
        from ltk.models.hf.folder import from_pretrained

        model = from_pretrained(path, backend=backend)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}; "
                             f"use models.from_pretrained to load any family")
        return model
