"""BERT: parity with transformers both ways (MLM and bare encoder), the masking objective,
strict conversion, parameter counts, and the triton backend against the torch one."""
import pytest
import torch
import torch.nn.functional as F

from ltk.kernels.backend import HAS_TRITON, interpreter_on
from ltk.models.bert import Bert, BertConfig, bert_config, num_params
from ltk.models.hf import bert as hf_bert
from ltk.training.mlm import mask_tokens

transformers = pytest.importorskip("transformers")

V, T = 101, 64  # odd vocabulary on purpose


def _hf_config(arch: str):
    return transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=T, architectures=[arch])


def _hf_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = getattr(transformers, arch)
    model = cls(_hf_config(arch)).eval()
    with torch.no_grad():  # random LayerNorm gains and biases too, so a swapped tensor shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B, S = 3, 19
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    mask[2, 4:] = 0
    types = torch.randint(0, 2, (B, S), generator=g)
    return ids, mask, types


def _hf_out(model, ids, mask, types):
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# Padded positions: both implementations mask padded *keys* only, so a padded query still
# attends to the real tokens and gets the same (unused) output in both; we compare every
# position, and the real ones separately, so a difference confined to padding would show which.
@pytest.mark.parametrize("arch", ["BertForMaskedLM", "BertModel"])
def test_parity_from_hf(arch):
    hf = _hf_model(arch)
    cfg = hf_bert.config_from_hf(hf.config.to_dict())
    assert cfg.mlm_head == (arch == "BertForMaskedLM") and cfg.pooler == (arch == "BertModel")
    cfg.backend = "torch"
    ours = Bert(cfg).eval()
    ours.load_state_dict(hf_bert.state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    ids, mask, types = _batch()
    with torch.no_grad():
        ref, got = _hf_out(hf, ids, mask, types), ours(ids, mask, types)
        assert got.shape == ref.shape
        assert (got - ref)[mask.bool()].abs().max().item() <= 1e-5
        assert (got - ref).abs().max().item() <= 1e-5
        if arch == "BertModel":
            pooled = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
            assert (ours.pool(got) - pooled).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mlm_head", [True, False])
def test_parity_to_hf(mlm_head):
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=64, intermediate_size=128,
                     mlm_head=mlm_head, pooler=not mlm_head, backend="torch")
    ours = Bert(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = hf_bert.config_to_hf(cfg)
    hc = transformers.BertConfig(**d)
    hf = getattr(transformers, d["architectures"][0])(hc).eval()
    missing, unexpected = hf.load_state_dict(hf_bert.state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    # only the tied decoder copies may be absent (the model ties them to what we wrote)
    assert not unexpected
    assert set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if mlm_head:
        assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    ids, mask, types = _batch(3)
    with torch.no_grad():
        assert (_hf_out(hf, ids, mask, types) - ours(ids, mask, types)).abs().max().item() <= 1e-5
    # and back: the round trip is the identity
    again = hf_bert.state_dict_from_hf(hf.state_dict(), hf_bert.config_from_hf(d))
    for k, v in ours.state_dict().items():
        assert torch.equal(again[k], v), k


def test_padding_is_masked():
    """Changing a padded token changes no real position's output."""
    torch.manual_seed(0)
    m = Bert(BertConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=32, intermediate_size=64,
                        backend="torch")).eval()
    ids, mask, types = _batch()
    ids2 = ids.clone()
    ids2[1, 11:] = (ids2[1, 11:] + 1) % V
    with torch.no_grad():
        a, b = m(ids, mask, types), m(ids2, mask, types)
        full = m(ids2)  # without the mask the real positions do change
    real = mask.bool()
    assert torch.equal(a[real], b[real])
    assert not torch.allclose(a[1, :11], full[1, :11])


def test_mask_tokens_statistics():
    specials = (0, 1, 2)  # e.g. padding, [CLS], [SEP]
    mask_id, vocab = 3, 1000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (200, 500), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1], ids[::7, 250:] = 1, 2, 0  # specials sprinkled in
    inputs, labels = mask_tokens(ids, vocab_size=vocab, mask_id=mask_id, special_ids=specials, generator=g)
    chosen = labels != -100
    is_special = torch.isin(ids, torch.tensor(specials))
    assert not (chosen & is_special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # untouched elsewhere
    frac = chosen.sum().item() / (~is_special).sum().item()
    assert frac == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()
    masked = (inputs == mask_id) & chosen
    kept = (inputs == ids) & chosen
    random = chosen & ~masked & ~kept
    # n ~ 15,000 chosen: one standard deviation is ~0.0033 for the 80% share, ~0.0025 for 10%
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.015)
    # a random draw equals the original with probability ~1/996: counted in `kept`
    assert random.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert not torch.isin(inputs[random], torch.tensor(specials + (mask_id,))).any()
    # deterministic with a seed, different with another
    again = mask_tokens(ids, vocab_size=vocab, mask_id=mask_id, special_ids=specials,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    other = mask_tokens(ids, vocab_size=vocab, mask_id=mask_id, special_ids=specials,
                        generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other[1], labels)
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(ids, vocab_size=vocab, mask_id=vocab, generator=g)


def test_mlm_loss_trains_debug_model():
    """A few steps of MLM on a repeated pattern lower the loss (the pieces fit together)."""
    torch.manual_seed(0)
    cfg = bert_config("bert-debug", vocab_size=40, block_size=32, backend="torch")
    m = Bert(cfg)
    opt = torch.optim.AdamW(m.param_groups(0.01), lr=3e-3)
    ids = (torch.arange(32).repeat(8, 1) + torch.arange(8)[:, None]) % 36 + 4
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        x, y = mask_tokens(ids, vocab_size=40, mask_id=3, special_ids=(0, 1, 2), generator=g)
        loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_conversion_is_strict():
    cfg = hf_bert.config_from_hf(_hf_config("BertForMaskedLM").to_dict())
    good = _hf_model("BertForMaskedLM").state_dict()
    hf_bert.state_dict_from_hf(good, cfg)  # loads
    t = dict(good)
    del t["bert.encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ValueError, match=r"missing.*bert\.encoder\.layer\.1\.attention\.self\.key\.bias"):
        hf_bert.state_dict_from_hf(t, cfg)
    t = dict(good, **{"bert.encoder.layer.7.output.dense.weight": torch.zeros(64, 128)})
    with pytest.raises(ValueError, match=r"unexpected.*bert\.encoder\.layer\.7\.output\.dense\.weight"):
        hf_bert.state_dict_from_hf(t, cfg)
    t = dict(good, **{"bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(127, 64)})
    with pytest.raises(ValueError, match=r"shape.*bert\.encoder\.layer\.0\.intermediate\.dense\.weight"):
        hf_bert.state_dict_from_hf(t, cfg)
    t = dict(good, **{"cls.predictions.decoder.weight": torch.zeros(V, 64)})
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight.*untied"):
        hf_bert.state_dict_from_hf(t, cfg)
    # a BertModel checkpoint's pooler is never dropped silently
    bare = _hf_model("BertModel").state_dict()
    no_pool = BertConfig(**{**vars(cfg), "mlm_head": False, "pooler": False})
    with pytest.raises(ValueError, match=r"unexpected.*pooler\.dense\.weight.*pooler=True"):
        hf_bert.state_dict_from_hf(bare, no_pool)
    # and the other direction
    ours = Bert(cfg).state_dict()
    del ours["layers.0.ln_2.bias"]
    with pytest.raises(ValueError, match=r"missing \['layers\.0\.ln_2\.bias'\]"):
        hf_bert.state_dict_to_hf(ours, cfg)


@pytest.mark.parametrize("field, value", [("position_embedding_type", "relative_key"), ("hidden_act", "relu"),
                                          ("is_decoder", True), ("architectures", ["BertForPreTraining"])])
def test_unsupported_configs_name_the_field(field, value):
    d = _hf_config("BertModel").to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=field):
        hf_bert.config_from_hf(d)


@pytest.mark.parametrize("kwargs, field", [(dict(n_embd=100, n_head=3), "n_head"), (dict(dropout=1.0), "dropout"),
                                           (dict(vocab_size=0), "vocab_size"), (dict(backend="cuda"), "backend"),
                                           (dict(intermediate_size=0), "intermediate_size")])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Bert(BertConfig(**kwargs))


@pytest.mark.parametrize("name", ["bert-debug", "bert-base", "bert-large"])
@pytest.mark.parametrize("mlm_head", [True, False])
def test_num_params_matches_the_module(name, mlm_head):
    cfg = bert_config(name, mlm_head=mlm_head, pooler=not mlm_head)
    if cfg.vocab_size == 0:
        cfg.vocab_size = 333
    with torch.device("meta"):
        model = Bert(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    assert num_params(bert_config("bert-base")) == 109_514_298  # BertForMaskedLM, bert-base-uncased
    assert num_params(bert_config("bert-base", mlm_head=False, pooler=True)) == 109_482_240  # BertModel


def test_init():
    torch.manual_seed(0)
    m = Bert(bert_config("bert-debug", vocab_size=500))
    assert m.layers[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.layers[1].ffn.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(m.layers[0].ln_1.weight == 1) and torch.all(m.layers[0].ffn.fc.bias == 0)
    assert torch.all(m.head.bias == 0) and torch.all(m.ln_emb.bias == 0)
    groups = m.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


@pytest.mark.skipif(not (HAS_TRITON and interpreter_on()) and not torch.cuda.is_available(),
                    reason="needs Triton (CUDA, or the interpreter on CPU)")
@pytest.mark.parametrize("mlm_head", [True, False])
def test_triton_backend_matches_torch(mlm_head):
    dev = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_embd=32, intermediate_size=48,
                     mlm_head=mlm_head, backend="torch")
    ref = Bert(cfg).to(dev).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tri = Bert(BertConfig(**{**vars(cfg), "backend": "triton"})).to(dev).eval()
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 37, (2, 13), device=dev)
    mask = torch.ones(2, 13, dtype=torch.long, device=dev)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert (tri(ids, mask) - ref(ids, mask)).abs().max().item() <= 1e-5
