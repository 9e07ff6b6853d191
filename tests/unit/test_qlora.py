"""QLoRA surgery (ltk/models/qlora.py, LoRA on NF4 bases in ltk/models/lora.py): quantization error,
exact start, what trains, checkpointing, storage bits, memory accounting, loading, adapters."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk import models
from ltk.kernels.nf4 import NF4Linear
from ltk.models.gpt import GPT, GPTConfig
from ltk.models.llama import Llama, LlamaConfig
from ltk.models.lm_head import LMHead
from ltk.models.lora import (
    apply_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    remove_lora,
    save_adapter,
)
from ltk.models.qlora import (
    NF4LinearDQ,
    dequantize_model,
    from_pretrained_qlora,
    memory_breakdown,
    prepare_qlora,
    quantize_model,
    quantized_bits_per_param,
)

F32 = dict(compute_dtype=torch.float32, backend="torch")
LLAMA_LINEARS = ["wq", "wk", "wv", "wo", "w1", "w3", "w2"]


def _llama(seed=0, tie=False):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=99, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=64, rope_theta=10000.0, tie_embeddings=tie, backend="torch")).eval()


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=99, block_size=32, n_layer=2, n_head=2, n_embd=32, backend="torch")).eval()


def _ids(seed=2, shape=(2, 11)):
    return torch.randint(0, 99, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_lora(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("make", [_llama, _gpt], ids=["llama", "gpt"])
def test_quantized_logits_match_the_dequantized_model(make):
    full, ids = make(), _ids()
    q = quantize_model(copy.deepcopy(full), **F32)
    nf4 = {n: m for n, m in q.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 2 * (7 if make is _llama else 4) and all(isinstance(m, NF4LinearDQ) for m in nf4.values())
    head, emb = (q.output, q.tok_embeddings) if make is _llama else (q.lm_head, q.wte)
    assert type(head) is LMHead and type(emb) is nn.Embedding  # stay in full precision
    if make is _gpt:
        assert q.lm_head.weight is q.wte.weight  # the tie survives
    # the same model with every quantized weight replaced by its dequantized NF4 value
    ref = copy.deepcopy(full)
    with torch.no_grad():
        for n, m in nf4.items():
            ref.get_submodule(n).weight.copy_(m.dequantized_weight(torch.float32))
        base, quant, deq = full(ids), q(ids), ref(ids)
    err_deq = (quant - deq).abs().max().item() / deq.abs().max().item()
    rel = _rel(quant, base)
    print(f"{make.__name__}: NF4 relative logit error {rel:.4f}; vs dequantized model {err_deq:.1e}")
    assert err_deq < 1e-5
    assert 0 < rel < 0.1  # 4-bit weights: a few % on the logits, never exact


def test_zero_B_qlora_equals_the_quantized_model_exactly():
    ids = _ids()
    q = quantize_model(_llama(), **F32)
    qlora = prepare_qlora(copy.deepcopy(q), LLAMA_LINEARS, r=4, alpha=8, **F32)
    assert len(lora_modules(qlora)) == 14 and all(m.quantized for m in lora_modules(qlora).values())
    assert qlora.activation_checkpointing
    with torch.no_grad():
        assert torch.equal(qlora(ids), q(ids))


def test_training_moves_only_lora_and_the_loss_falls():
    model, ids = prepare_qlora(_llama(), ["wq", "wv", "w2"], r=4, alpha=8, **F32), _ids(shape=(4, 17))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    before = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(10):  # random tokens: the adapters must memorize them, a few steps each 0.01
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 99), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("QLoRA losses", [f"{x:.4f}" for x in losses])
    assert losses[-1] < losses[0] - 0.05
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert (not torch.equal(t, before[n])) == n.endswith(("lora_A", "lora_B")), n


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = prepare_qlora(_llama(), LLAMA_LINEARS, r=4, alpha=8, gradient_checkpointing=ckpt, **F32)
        assert model.activation_checkpointing == ckpt
        _randomize_lora(model)  # B != 0, so A gets a gradient too
        model.train()
        ids = _ids(shape=(2, 13))
        F.cross_entropy(model(ids[:, :-1]).reshape(-1, 99), ids[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    err = max(((grads[0][n] - grads[1][n]).abs().max() / grads[0][n].abs().max()).item() for n in grads[0])
    print(f"checkpointing on vs off: max relative gradient difference {err:.1e}")
    assert err < 1e-5


def _expected_bits(n, blocksize=64, blocksize2=256):
    blocks = -(-n // blocksize)
    return 8 * ((n + 1) // 2 + blocks + 4 * -(-blocks // blocksize2) + 4) / n


def test_bits_per_param_with_double_quantization():
    q = quantize_model(_llama(), **F32)
    sizes = [m.in_features * m.out_features for m in q.modules() if isinstance(m, NF4Linear)]
    exact = sum(_expected_bits(n) * n for n in sizes) / sum(sizes)
    assert quantized_bits_per_param(q) == pytest.approx(exact, rel=1e-12)
    big = quantize_model(nn.Sequential(nn.Linear(1024, 1024, bias=False)), targets=["0"], **F32)
    bits = quantized_bits_per_param(big)
    print(f"bits/param: tiny Llama {quantized_bits_per_param(q):.4f}, 1024x1024 {bits:.5f} "
          f"(4 + 8/64 + 32/(64*256) = {4 + 8 / 64 + 32 / (64 * 256):.5f})")
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    single = quantize_model(nn.Sequential(nn.Linear(1024, 1024, bias=False)), targets=["0"], double_quant=False, **F32)
    assert type(single[0]) is NF4Linear and quantized_bits_per_param(single) == 4 + 32 / 64


def test_memory_breakdown_equals_hand_computed_bytes():
    model = prepare_qlora(_llama(), ["wq", "wv"], r=2, alpha=4, **F32)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
    empty = memory_breakdown(model)
    assert empty["gradients"] == 0 and empty["optimizer_states"] == 0
    model.train()
    ids = _ids()
    F.cross_entropy(model(ids[:, :-1]).reshape(-1, 99), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    got = memory_breakdown(model, opt)
    d, kv, inter, V, L = 32, 16, 64, 99, 2
    sizes = [d * d, d * kv, d * kv, d * d, d * inter, d * inter, inter * d]  # wq wk wv wo w1 w3 w2
    packed = L * sum(n // 2 for n in sizes)
    stats = L * sum(n // 64 + 4 * math.ceil(n / 64 / 256) + 4 for n in sizes)  # codes + scales + offset
    full = 4 * (2 * V * d + (2 * L + 1) * d)  # embedding + untied head + RMSNorm gains, fp32
    lora = 4 * L * (2 * (d + d) + 2 * (d + kv))  # A (r, in) + B (out, r) on wq and wv
    states = 2 * lora + 4 * (4 * L)  # exp_avg + exp_avg_sq, and one fp32 step a tensor
    want = dict(base_nf4_packed=packed, base_nf4_stats=stats, base_full=full, trainable=lora, gradients=lora,
                optimizer_states=states)
    want["total"] = sum(want.values())
    print("memory_breakdown", got)
    assert got == want
    tied = quantize_model(_gpt(), **F32)  # the tied head/embedding storage is counted once
    mem = memory_breakdown(tied)  # parameters() lists the tied weight once too
    assert mem["base_full"] + mem["trainable"] == 4 * sum(p.numel() for p in tied.parameters())
    assert len(list(tied.parameters())) < len(list(tied.named_parameters(remove_duplicate=False)))


def test_merge_is_refused_and_remove_lora_dequantizes():
    model, ids = prepare_qlora(_llama(), ["wq", "w2"], r=4, alpha=8, **F32), _ids()
    _randomize_lora(model)
    with pytest.raises(ValueError, match="4-bit NF4 base.*remove_lora"):
        merge_lora(model)
    with torch.no_grad():
        want = model(ids)
        full = dequantize_model(copy.deepcopy(model))  # LoRA on full-precision Linears, same A, B
        assert not any(isinstance(m, NF4Linear) for m in full.modules())
        assert (full(ids) - want).abs().max().item() < 1e-5
        merge_lora(full)
        assert (full(ids) - want).abs().max().item() < 1e-5
        remove_lora(model)
        assert not lora_modules(model) and type(model.layers[0].attn.wq) is nn.Linear
        assert (model(ids) - want).abs().max().item() < 1e-5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="tied"):
        quantize_model(_gpt(), targets=["lm_head"], **F32)
    with pytest.raises(ValueError, match="quantize first"):
        quantize_model(apply_lora(_llama(), ["wq"]), **F32)
    with pytest.raises(ValueError, match=r"matched no nn\.Linear: \['q_proj'\]"):
        quantize_model(_llama(), targets=["q_proj"], **F32)


def test_adapter_round_trip_onto_a_fresh_quantized_model(tmp_path):
    model, ids = prepare_qlora(_llama(), LLAMA_LINEARS, r=4, alpha=8, use_rslora=True, **F32), _ids()
    _randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 28 and all(".lora_" in k for k in saved)  # adapter tensors only
    fresh = quantize_model(_llama(), **F32)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(m.quantized for m in lora_modules(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    gpt = prepare_qlora(_gpt(), ["c_attn", "mlp.c_proj"], r=2, alpha=4, **F32)
    _randomize_lora(gpt)
    save_adapter(gpt, tmp_path / "gpt")
    fresh_gpt = load_adapter(quantize_model(_gpt(), **F32), tmp_path / "gpt")
    with torch.no_grad():
        assert torch.equal(fresh_gpt(ids), gpt(ids))


def test_from_pretrained_qlora_on_a_transformers_llama_folder(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "base")
    q = from_pretrained_qlora(tmp_path / "base", **F32)
    assert not any(t.is_meta for t in list(q.parameters()) + list(q.buffers()))
    assert sum(isinstance(m, NF4LinearDQ) for m in q.modules()) == 14 and type(q.output) is LMHead
    want = quantize_model(models.from_pretrained(tmp_path / "base", backend="torch"), **F32)
    ids = _ids()
    with torch.no_grad():
        got, ref = q(ids), want(ids)
        theirs = hf.eval()(input_ids=ids).logits
    assert torch.equal(got, ref)
    print(f"from_pretrained_qlora vs transformers fp32: relative logit error {_rel(got, theirs):.4f}")
    assert _rel(got, theirs) < 0.1
    prepare_qlora(q, ["wq", "wv"], r=2, **F32)  # and it fine-tunes like any quantized model
    q.train()
    F.cross_entropy(q(ids[:, :-1]).reshape(-1, 99), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None for p in lora_parameters(q))


def test_bf16_compute_keeps_adapters_in_bf16_and_trains():
    model, ids = prepare_qlora(_llama(), ["wq", "w2"], r=4, backend="torch"), _ids()  # default: bf16
    assert all(p.dtype == torch.bfloat16 for p in lora_parameters(model))
    assert model.output.weight.dtype == torch.float32  # the head stays in full precision
    model.train()
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.float().reshape(-1, 99), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model))
    with torch.no_grad():
        assert _rel(logits.float(), _llama()(ids[:, :-1])) < 0.1
