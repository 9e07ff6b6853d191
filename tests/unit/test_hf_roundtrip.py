"""Every converter against the folders that the installed transformers writes with
save_pretrained (tiny configs built offline, random weights), both ways: our from_pretrained
loads their folder with logits within 1e-5 of theirs, and their from_pretrained loads the folder
we write with logits within 1e-5 of ours. Also the two conventions by which T5 configs say
whether the head is tied (before transformers 5 and since)."""
import pytest
import torch
import torch.nn as nn

from ltk.models import Bert, from_pretrained
from ltk.models.hf import t5 as hf_t5
from ltk.models.t5 import T5, T5Config

tf = pytest.importorskip("transformers")

V = 99


def _t5_config(ff: str, **kw):
    return tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                       relative_attention_num_buckets=8, feed_forward_proj=ff, dropout_rate=0.0, **kw)


def _untied_t5_11():
    """T5 1.1 as Google published it: a head with weights of its own (transformers 5 would tie a
    freshly built one to the embedding)."""
    hf = tf.T5ForConditionalGeneration(_t5_config("gated-gelu", tie_word_embeddings=False))
    hf.lm_head.weight = nn.Parameter(torch.randn_like(hf.shared.weight))
    return hf


CASES = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "llama-tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)),
    "bert-mlm": lambda: tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)),
    "bert-bare": lambda: tf.BertModel(tf.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)),
    "t5-1.0": lambda: tf.T5ForConditionalGeneration(_t5_config("relu")),
    # what transformers 5 writes for 1.1: tie_word_embeddings true, scale_decoder_outputs false, no lm_head
    "t5-1.1": lambda: tf.T5ForConditionalGeneration(_t5_config("gated-gelu", tie_word_embeddings=False)),
    "t5-1.1-untied": _untied_t5_11,
}


def _outputs(model, ids, ours: bool) -> list[torch.Tensor]:
    """Logits (last hidden states and the pooled output for the bare BERT)."""
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second row, so the masks are exercised too
    with torch.no_grad():
        if isinstance(model, (T5, tf.T5ForConditionalGeneration)):
            dec = ids[:, :5]
            return [model(ids, dec) if ours else model(input_ids=ids, decoder_input_ids=dec).logits]
        if ours and isinstance(model, Bert):
            out = model(ids, attention_mask=mask)
            return [out] if model.config.mlm_head else [out, model.pool(out)]
        if ours:
            return [model(ids)]
        if isinstance(model, tf.BertModel):
            out = model(input_ids=ids, attention_mask=mask)
            return [out.last_hidden_state, out.pooler_output]
        if isinstance(model, tf.BertForMaskedLM):
            return [model(input_ids=ids, attention_mask=mask).logits]
        return [model(input_ids=ids).logits]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_their_folder_loads_in_ours_and_ours_in_theirs(case, tmp_path):
    torch.manual_seed(0)
    hf = CASES[case]().eval()
    hf.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, V, (2, 11))
    _assert_close(_outputs(ours, ids, True), _outputs(hf, ids, False))

    with torch.no_grad():  # move away from their weights, so the second check is not trivially true
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    _assert_close(_outputs(ours, ids, True), _outputs(back, ids, False))


def test_t5_11_from_transformers_5_is_untied_without_rescale(tmp_path):
    """The folder of a T5 1.1 that transformers 5 built: its head is the embedding, unscaled."""
    torch.manual_seed(0)
    hf = CASES["t5-1.1"]()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.feed_forward == "gated-gelu" and not ours.config.tie_embeddings
    assert torch.equal(ours.lm_head.weight, hf.shared.weight)
    assert ours.lm_head.weight.data_ptr() != ours.shared.weight.data_ptr()  # a copy, not an alias


def _hf_t5_config(**fields) -> dict:
    return {"model_type": "t5", "vocab_size": V, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 1,
            "num_heads": 4, "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", **fields}


@pytest.mark.parametrize("fields,tied", [
    ({}, True),                                                          # the default: T5 1.0's head
    ({"tie_word_embeddings": True}, True),                               # before transformers 5: 1.0
    ({"tie_word_embeddings": False}, False),                             # before transformers 5: 1.1
    ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, True),   # transformers 5: 1.0
    ({"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),  # transformers 5: 1.1
])
def test_t5_head_conventions(fields, tied):
    assert hf_t5.config_from_hf(_hf_t5_config(**fields)).tie_embeddings is tied


@pytest.mark.parametrize("tied", [True, False])
def test_t5_config_we_write_reads_the_same_in_both_conventions(tied):
    cfg = T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=24, n_layer=1, n_head=4, relative_attention_num_buckets=8,
                   feed_forward="gated-gelu", tie_embeddings=tied)
    d = hf_t5.config_to_hf(cfg)
    assert d["tie_word_embeddings"] is tied and d["scale_decoder_outputs"] is tied
    assert tf.T5Config(**d).scale_decoder_outputs is tied  # how the installed transformers reads it
    assert hf_t5.config_from_hf(d).tie_embeddings is tied


def test_t5_head_left_out_is_the_embedding_and_a_rescaled_untied_head_is_refused():
    cfg = hf_t5.config_from_hf(_hf_t5_config(tie_word_embeddings=True, scale_decoder_outputs=False))
    torch.manual_seed(0)
    theirs = hf_t5.state_dict_to_hf(T5(cfg).state_dict(), cfg)
    del theirs["lm_head.weight"]
    ours = hf_t5.state_dict_from_hf(theirs, cfg)
    assert torch.equal(ours["lm_head.weight"], theirs["shared.weight"])

    tied_cfg = hf_t5.config_from_hf(_hf_t5_config(scale_decoder_outputs=True))
    theirs = hf_t5.state_dict_to_hf(T5(tied_cfg).state_dict(), tied_cfg)
    theirs["lm_head.weight"] = torch.randn_like(theirs["shared.weight"])  # untied, but rescaled
    with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight"):
        hf_t5.state_dict_from_hf(theirs, tied_cfg)


def test_t5_config_with_a_non_boolean_tie_is_refused():
    with pytest.raises(ValueError, match="scale_decoder_outputs"):
        hf_t5.config_from_hf(_hf_t5_config(scale_decoder_outputs="no"))
