"""The base read a tensor at a time (ltk/training/base_stream.py): every tensor equal to the whole
read (our checkpoints; transformers folders of GPT-2 and Llama, single file and sharded, renamed and
transposed as ltk/models/hf/ converts them), and the ledger's peak one tensor, not the base."""
import pytest
import torch

from ltk.training.base_model import Base, open_base
from ltk.training.base_stream import BaseReader


def _check(base: Base, whole: dict[str, torch.Tensor]) -> None:
    reader = BaseReader(base)
    assert reader.names() == set(whole)
    for name, t in whole.items():
        assert torch.equal(reader.read(name), t), name
    led = reader.ledger
    assert led.reads == len(whole)
    assert led.read_bytes == sum(t.numel() * t.element_size() for t in whole.values())
    # GPT-2's Conv1D weights: the file's tensor and its transpose, both alive for a moment
    assert led.peak <= 2 * max(t.numel() * t.element_size() for t in whole.values())
    assert led.live == 0
    reader.close()
    with pytest.raises(KeyError, match="has no tensor nope"):
        reader.read("nope")


def test_our_checkpoint(tiny_base):
    from ltk.training.checkpoint import full_model_state

    base = open_base(tiny_base)
    _check(base, full_model_state(base.path))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded"])
def test_transformers_folder(family, layout, tmp_path):
    tf = pytest.importorskip("transformers")
    from ltk.models.hf.folder import read_config, read_folder

    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4)) \
        if family == "gpt2" else \
        tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    _, cfg, _ = read_config(tmp_path)
    _check(Base(tmp_path, True, "gpt" if family == "gpt2" else "llama", cfg, tmp_path), read_folder(tmp_path)[2])
