"""Hugging Face folders on disk, both ways, for every family: transformers writes a folder
(single file, sharded, or pickled .bin) and we load it; we write one and transformers loads it;
the logits agree within 1e-5."""
import json

import pytest
import torch

from ltk.models import from_pretrained, save_pretrained

tf = pytest.importorskip("transformers")


def _models():
    torch.manual_seed(0)
    return {
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2,
                                                  n_head=4)), False),
        "llama": (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     max_position_embeddings=64)), False),
        "bert": (tf.BertForMaskedLM(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64,
                                                  max_position_embeddings=64)), False),
        "t5": (tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                         num_heads=4, relative_attention_num_buckets=8)), True),
    }


def _logits(model, ids, seq2seq, ours):
    with torch.no_grad():
        if seq2seq:
            return model(ids, ids[:, :5]) if ours else model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(ids) if ours else model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_load_a_transformers_folder(family, layout, tmp_path):
    hf, seq2seq = _models()[family]
    hf.eval()
    hf.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    if layout == "sharded":
        assert list(tmp_path.glob("*.index.json"))
    if layout == "bin":  # transformers 5 writes safetensors only: the pickle of its state dict, as 4 did
        from safetensors.torch import load_file

        torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 99, (2, 11))
    assert (_logits(ours, ids, seq2seq, True) - _logits(hf, ids, seq2seq, False)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_transformers_loads_the_folder_we_write(family, tmp_path):
    hf, seq2seq = _models()[family]
    ours = from_pretrained(_saved(hf, tmp_path / "src"))
    with torch.no_grad():  # move our weights away from theirs, so the check is not trivially true
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "out")  # the method form (models.save_pretrained is the same)
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written under temporary names, renamed into place
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 99, (2, 11))
    assert (_logits(ours, ids, seq2seq, True) - _logits(back, ids, seq2seq, False)).abs().max() <= 1e-5


def _saved(hf, path):
    hf.save_pretrained(path)
    return path


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        from_pretrained(tmp_path)
    hf, _ = _models()["gpt2"]
    hf.save_pretrained(tmp_path / "g")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "g" / "model.safetensors"))
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, str(tmp_path / "g" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
        from_pretrained(tmp_path / "g")


def test_class_method_loads_its_own_family_only(tmp_path):
    from ltk.models import GPT, Llama

    hf, _ = _models()["gpt2"]
    hf.save_pretrained(tmp_path)
    assert isinstance(GPT.from_pretrained(tmp_path), GPT)
    with pytest.raises(ValueError, match="not a Llama"):
        Llama.from_pretrained(tmp_path)
    save_pretrained(GPT.from_pretrained(tmp_path), tmp_path / "again")  # the function form still works
    assert (tmp_path / "again" / "config.json").exists()
