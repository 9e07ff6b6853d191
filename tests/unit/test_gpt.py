import math

import pytest
import torch
import torch.nn.functional as F

from ltk.models.gpt import GPT, GPTConfig, flops_per_token, gpt_config, num_params


def test_gpt2_124m_parameter_count():
    cfg = gpt_config("gpt2-124m")
    assert num_params(cfg) == 124_439_808
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


@pytest.mark.parametrize("name", ["gpt2-350m", "gpt2-774m", "gpt2-1.5b"])
def test_num_params_matches_the_module(name):
    cfg = gpt_config(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_is_6n_plus_attention():
    cfg = gpt_config("gpt2-124m")
    n = num_params(cfg) - 1024 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, 512) < flops_per_token(cfg)


def test_tied_embedding_and_init_scales():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=128)
    m = GPT(cfg)
    assert m.lm_head.weight is m.wte.weight
    assert m.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert m.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(m.h[0].ln_1.weight == 1) and torch.all(m.h[0].attn.c_attn.bias == 0)


def _manual_attention_forward(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The same network with attention spelled out (softmax(q kᵀ/sqrt(d) + mask) v)."""
    B, T = idx.shape
    x = m.wte(idx) + m.wpe(torch.arange(T))
    for blk in m.h:
        h = blk.ln_1(x)
        q, k, v = blk.attn.c_attn(h).split(x.size(-1), dim=2)
        nh = blk.attn.n_head
        q, k, v = (t.view(B, T, nh, -1).transpose(1, 2) for t in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        x = x + blk.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, -1))
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(x)), approximate="tanh"))
    return m.lm_head(m.ln_f(x))


def test_forward_matches_explicit_attention_and_is_causal():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)).double()
    idx = torch.randint(0, 97, (3, 13))
    out = m(idx)
    assert out.shape == (3, 13, 97)
    torch.testing.assert_close(out, _manual_attention_forward(m, idx), rtol=1e-10, atol=1e-10)
    idx2 = idx.clone()
    idx2[:, 7:] = torch.randint(0, 97, (3, 6))  # changing the future leaves the past alone
    torch.testing.assert_close(m(idx2)[:, :7], out[:, :7])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (2, 8))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.activation_checkpointing = ckpt
        m(idx).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="block_size 8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        m(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="n_head"):
        GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=3, n_embd=16))
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(GPTConfig(vocab_size=0))
    with pytest.raises(ValueError, match="unknown GPT size"):
        gpt_config("gpt5")


def test_param_groups_decay_matrices_only():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    decay, no_decay = m.param_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())  # the tied matrix counted once


def test_kv_cached_greedy_equals_uncached_and_transformers():
    transformers = pytest.importorskip("transformers")
    from ltk.models.generate import generate
    from ltk.models.hf.gpt2 import config_from_hf, state_dict_from_hf

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=61, n_positions=40, n_embd=32, n_layer=2,
                                                              n_head=4)).eval()
    cfg = config_from_hf(hf.config.to_dict())
    m = GPT(cfg).eval()
    m.load_state_dict({**state_dict_from_hf(hf.state_dict(), cfg), "lm_head.weight": hf.lm_head.weight})
    prompt = torch.randint(0, 61, (2, 6))
    kw = dict(block_size=40, temperature=0.0, top_k=None)
    cached = generate(m, prompt, 20, use_cache=True, **kw)
    uncached = generate(m, prompt, 20, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(cached, theirs)
    cache = m.new_cache(2)  # step-by-step logits equal the full forward's
    with torch.no_grad():
        full = m(cached[:, :10])
        steps = torch.cat([m(cached[:, :6], kv_cache=cache)]
                          + [m(cached[:, i:i + 1], kv_cache=cache) for i in range(6, 10)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
