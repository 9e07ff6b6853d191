"""GPT-2 checkpoints both ways against transformers (random weights, built offline)."""
import pytest
import torch

from ltk.models.gpt import GPT
from ltk.models.hf.gpt2 import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf

transformers = pytest.importorskip("transformers")


def _hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_logits_match_both_ways():
    hf = _hf_model()
    ids = torch.randint(0, 97, (2, 13))
    cfg = config_from_hf(hf.config.to_dict())
    ours = GPT(cfg).eval()
    ours.load_state_dict({**state_dict_from_hf(hf.state_dict(), cfg), "lm_head.weight": hf.lm_head.weight}, strict=True)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-5

    torch.manual_seed(1)
    mine = GPT(cfg).eval()
    back = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg))).eval()
    back.load_state_dict(state_dict_to_hf(mine.state_dict(), cfg), strict=False)
    with torch.no_grad():
        assert (back(input_ids=ids).logits - mine(ids)).abs().max().item() <= 1e-5


def test_bare_gpt2model_keys_and_mask_buffers_load():
    hf = _hf_model()
    cfg = config_from_hf(hf.config.to_dict())
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # an old checkpoint's causal-mask buffer
    out = state_dict_from_hf(bare, cfg)
    assert "h.0.attn.bias" not in out and out["h.0.attn.c_attn.weight"].shape == (3 * 48, 48)


def test_strict_conversion_names_tensors_and_fields():
    hf = _hf_model()
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    del sd["transformer.h.1.ln_2.bias"]
    sd["transformer.h.0.mlp.c_fc.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"h\.1\.ln_2\.bias.*h\.0\.mlp\.c_fc\.bias"):
        state_dict_from_hf(sd, cfg)
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf({**hf.config.to_dict(), "activation_function": "relu"})
    with pytest.raises(ValueError, match="n_inner"):
        config_from_hf({**hf.config.to_dict(), "n_inner": 100})
