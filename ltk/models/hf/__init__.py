"""Hugging Face checkpoints in and out, one converter module per family.

Each family module (ltk/models/hf/gpt2.py, llama.py, bert.py, t5.py) translates between a
transformers `config.json` dict and our config dataclass, and between transformers' tensor
names (and layouts) and ours, in both directions:

    config_from_hf(hf_config: dict) -> our config        config_to_hf(cfg) -> dict
    state_dict_from_hf(tensors, cfg) -> our tensors      state_dict_to_hf(tensors, cfg) -> HF tensors

Conversions are strict: a tensor that is missing, unexpected or of the wrong shape is an
error that names it, never a silent random init. Folders on disk: ltk/models/hf/folder.py
(`from_pretrained`, `save_pretrained`).

The other direction, our kernels inside transformers' own models without converting them:
ltk/models/hf/patch.py (`ltk.patch`, `ltk.unpatch`; the loss part in patch_loss.py) and
ltk/models/hf/attn_interface.py (`attn_implementation="ltk"`).
"""
