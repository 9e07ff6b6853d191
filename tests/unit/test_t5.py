import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from ltk.kernels.backend import HAS_TRITON, interpreter_on  # noqa: E402
from ltk.models.hf.t5 import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf  # noqa: E402
from ltk.models.t5 import T5, T5_PRESETS, T5Config, num_params, t5_config  # noqa: E402
from ltk.training.span_corruption import span_corrupt, t5_sentinel_ids  # noqa: E402

VARIANTS = {"t5-1.0": ("relu", True), "t5-1.1": ("gated-gelu", False)}


def _hf_model(ff: str, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    hc = transformers.T5Config(vocab_size=101, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                               feed_forward_proj=ff, tie_word_embeddings=tied, dropout_rate=0.0,
                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration(hc).eval()
    _untie_if_needed(hf, tied)
    return hf


def _untie_if_needed(hf, tied: bool) -> None:
    """Some transformers 5.x construction paths tie T5's head to the embedding even for an
    untied (1.1) config; give the head its own weights so the test checks an untied model."""
    if not tied and hf.lm_head.weight is hf.shared.weight:
        hf.lm_head.weight = nn.Parameter(torch.randn_like(hf.shared.weight))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 101, (3, 23), generator=g)
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    y = torch.randint(2, 101, (3, 19), generator=g)
    return x, mask, y


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_transformers_both_ways(variant):
    ff, tied = VARIANTS[variant]
    hf = _hf_model(ff, tied)
    cfg = config_from_hf(hf.config.to_dict())
    cfg.backend = "torch"
    assert (cfg.feed_forward, cfg.tie_embeddings) == (ff, tied)
    ours = T5(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    x, mask, y = _batch()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        got = ours(x, y, mask)
    assert (got - ref).abs().max().item() <= 1e-5

    # reverse: a fresh random model of ours -> transformers
    torch.manual_seed(5)
    ours2 = T5(cfg).eval()
    hf2 = transformers.T5ForConditionalGeneration(transformers.T5Config(**config_to_hf(cfg))).eval()
    _untie_if_needed(hf2, tied)
    hf2.load_state_dict(state_dict_to_hf(ours2.state_dict(), cfg), strict=True)
    with torch.no_grad():
        ref2 = hf2(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        got2 = ours2(x, y, mask)
    assert (got2 - ref2).abs().max().item() <= 1e-5
    assert (got2 - got).abs().max().item() > 1e-2  # different models: the comparison can fail


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decoding_matches_transformers_and_encodes_once(variant):
    ff, tied = VARIANTS[variant]
    hf = _hf_model(ff, tied, seed=3)
    cfg = config_from_hf(hf.config.to_dict())
    cfg.backend = "torch"
    ours = T5(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    x, mask, _ = _batch(2)
    calls = []
    ours.encoder.register_forward_hook(lambda *a: calls.append(1))
    got = ours.generate_greedy(x, 10, attention_mask=mask, decoder_start_token_id=0, eos_id=1)
    ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1,
                      decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    assert got.tolist() == ref.tolist()
    assert len(calls) == 1


def test_span_corruption_statistics_reconstruction_and_determinism():
    sentinels = t5_sentinel_ids(1000, 100)
    tokens = torch.arange(2, 202)  # 200 distinct ids, none a sentinel or eos
    noise_frac, span_lens = [], []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        inp, tgt = span_corrupt(tokens, sentinel_ids=sentinels, eos_id=1, generator=g)
        assert inp[-1] == 1 and tgt[-1] == 1
        used = [t for t in inp.tolist() if t in sentinels]
        assert used == sentinels[:len(used)]  # in order
        assert [t for t in tgt.tolist() if t in sentinels] == sentinels[:len(used) + 1]
        # rebuild: each sentinel in the input is replaced by what follows it in the targets
        spans, cur = {}, None
        for t in tgt[:-1].tolist():
            if t in sentinels:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = []
        for t in inp[:-1].tolist():
            rebuilt += spans[t] if t in sentinels else [t]
        assert rebuilt == tokens.tolist()
        n_noise = sum(len(v) for v in spans.values())
        noise_frac.append(n_noise / len(tokens))
        span_lens.append(n_noise / len(used))
    assert sum(noise_frac) / len(noise_frac) == pytest.approx(0.15, abs=0.01)
    assert sum(span_lens) / len(span_lens) == pytest.approx(3.0, abs=0.15)
    a = span_corrupt(tokens.tolist(), sentinel_ids=sentinels, eos_id=1, generator=torch.Generator().manual_seed(9))
    b = span_corrupt(tokens, sentinel_ids=sentinels, eos_id=1, generator=torch.Generator().manual_seed(9))
    c = span_corrupt(tokens, sentinel_ids=sentinels, eos_id=1, generator=torch.Generator().manual_seed(10))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(a, c))
    with pytest.raises(ValueError, match="sentinel"):
        span_corrupt(tokens, sentinel_ids=sentinels[:3], eos_id=1)


def test_strict_conversion_names_the_tensor():
    hf = _hf_model("relu", True)
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    del sd[name]
    with pytest.raises(ValueError, match="missing: .*" + name.replace(".", r"\.")):
        state_dict_from_hf(sd, cfg)
    sd = dict(hf.state_dict())
    sd["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = torch.zeros(7, 64)
    with pytest.raises(ValueError, match=r"wrong shape: encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight"):
        state_dict_from_hf(sd, cfg)
    sd = dict(hf.state_dict())
    sd["encoder.block.9.layer.0.layer_norm.weight"] = torch.ones(64)
    with pytest.raises(ValueError, match=r"unexpected: encoder\.block\.9"):
        state_dict_from_hf(sd, cfg)
    ours = dict(T5(cfg).state_dict())
    del ours["encoder.final_norm.weight"]
    with pytest.raises(ValueError, match=r"encoder\.final_norm\.weight"):
        state_dict_to_hf(ours, cfg)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        config_from_hf({**hf.config.to_dict(), "feed_forward_proj": "gated-silu"})


@pytest.mark.parametrize("name", sorted(T5_PRESETS))
def test_num_params_matches_the_module(name):
    cfg = t5_config(name, vocab_size=32128 if name == "t5-debug" else T5_PRESETS[name].get("vocab_size", 32128))
    with torch.device("meta"):
        model = T5(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    known = {"t5-small": 60_506_624, "t5-base": 222_903_552, "t5-v1_1-small": 76_961_152}
    if name in known:  # transformers' counts for these checkpoints' configs
        assert num_params(cfg) == known[name]


@pytest.mark.skipif(not (HAS_TRITON and interpreter_on()), reason="needs the Triton interpreter on CPU")
def test_triton_backend_matches_torch_with_bias_gradient():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=37, d_model=32, d_kv=8, d_ff=48, n_layer=1, n_decoder_layer=1, n_head=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, backend="torch")
    ref = T5(cfg)
    tri = T5(T5Config(**{**cfg.__dict__, "backend": "triton"}))
    tri.load_state_dict(ref.state_dict())
    x = torch.randint(0, 37, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    y = torch.randint(0, 37, (2, 5))
    out_ref, out_tri = ref(x, y, mask), tri(x, y, mask)
    assert (out_ref - out_tri).abs().max().item() <= 1e-5
    out_ref.square().mean().backward()
    out_tri.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    assert ref.encoder.relative_bias.weight.grad.abs().max() > 0


@pytest.mark.parametrize("ff,tied", [("relu", True), ("gated-gelu", False)])
def test_train_flops_counts_every_matmul(ff, tied, monkeypatch):
    """train_flops equals what PyTorch's FLOP counter sees in a forward + backward, with the
    attention written as plain matmuls (the counter does not see inside fused SDPA on a CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    import ltk.models.t5 as t5mod
    from ltk.kernels.attention import attention_reference

    monkeypatch.setattr(t5mod, "attention", lambda q, k, v, backend=None, **kw: attention_reference(q, k, v, **kw))
    cfg = T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=64, n_layer=2, n_decoder_layer=3, n_head=4,
                   feed_forward=ff, tie_embeddings=tied, backend="torch")
    model, (Te, Td) = T5(cfg), (13, 7)
    x, y = torch.randint(0, 101, (2, Te)), torch.randint(0, 101, (2, Td))
    with FlopCounterMode(display=False) as counter:
        model(x, y).sum().backward()
    assert counter.get_total_flops() == 2 * t5mod.train_flops(cfg, Te, Td)


def test_flops_per_token_uses_the_span_corruption_lengths():
    from ltk.models.t5 import flops_per_token, span_corruption_lengths, train_flops
    from ltk.training.span_corruption import span_corrupt

    cfg = T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, n_layer=2, n_decoder_layer=2, n_head=4)
    for n in (16, 64, 128, 512):
        inputs, targets = span_corrupt(torch.arange(n), sentinel_ids=range(200, 300), eos_id=0)
        assert span_corruption_lengths(n) == (len(inputs), len(targets))
        assert flops_per_token(cfg, n) == train_flops(cfg, len(inputs), len(targets)) / n
