"""LoRA (ltk/models/lora.py): exact start, merge/unmerge, what trains, and PEFT interop both ways."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ltk import models
from ltk.models.gpt import GPT, GPTConfig
from ltk.models.llama import Llama, LlamaConfig
from ltk.models.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    remove_lora,
    save_adapter,
    trainable_parameter_count,
    unmerge_lora,
)

LLAMA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=99, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=64, rope_theta=10000.0, backend="torch")).eval()


def _randomize(model, seed=1, std=0.1):
    """Nonzero B (and fresh A), so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def _ids(seed=2, vocab=99):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def test_zero_B_starts_at_the_base_model():
    model, ids = _llama(), _ids()
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, LLAMA_TARGETS, r=4, alpha=8)
        assert len(lora_modules(model)) == 2 * 7
        assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for m in lora_modules(model).values())
        assert torch.equal(model(ids), base)


def test_merge_equals_unmerged_and_unmerge_restores_the_weight():
    model, ids = _llama(), _ids()
    w0 = model.layers[0].attn.wq.weight.detach().clone()
    apply_lora(model, ["layers.*.attn.wq", "attn.wv", "w2"], r=4, alpha=8)
    _randomize(model)
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        assert not torch.allclose(model.layers[0].attn.wq.weight, w0)
        assert (merged - unmerged).abs().max().item() < 1e-5
        unmerge_lora(model)
        assert (model.layers[0].attn.wq.weight - w0).abs().max().item() < 1e-6
        assert (model(ids) - unmerged).abs().max().item() < 1e-5
        remove_lora(model)  # plain Linears with W + s·BA
        assert not lora_modules(model) and type(model.layers[0].attn.wq) is nn.Linear
        assert (model(ids) - unmerged).abs().max().item() < 1e-5


def test_delta_has_rank_at_most_r_and_the_scales():
    lin = nn.Linear(24, 40)
    m = LoRALinear(lin, r=3, alpha=12)
    nn.init.normal_(m.lora_B)
    assert m.scaling == 12 / 3
    assert torch.linalg.matrix_rank(m.delta_weight().detach()).item() == 3
    assert torch.allclose(m.delta_weight(), 4.0 * m.lora_B @ m.lora_A)
    rs = LoRALinear(nn.Linear(24, 40), r=16, alpha=8, use_rslora=True)
    assert rs.scaling == 8 / math.sqrt(16) == 2.0
    x = torch.randn(5, 24)
    nn.init.normal_(rs.lora_B)
    expected = x @ rs.weight.T + rs.bias + 2.0 * x @ rs.lora_A.T @ rs.lora_B.T
    assert torch.allclose(rs(x), expected, atol=1e-5)


def test_only_lora_parameters_train():
    model, ids = _llama(), _ids()
    apply_lora(model, ["wq", "wv"], r=2, alpha=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    d, kv = 32, 16  # wq: 32 -> 32, wv: 32 -> 16 (2 kv heads of 8)
    assert trainable_parameter_count(model) == 2 * (2 * (d + d) + 2 * (d + kv))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(lora_parameters(model), lr=0.1)
    model.train()
    for _ in range(2):  # step 1 moves only B (A's gradient is 0 while B = 0), step 2 moves A too
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 99), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.endswith(("lora_A", "lora_B")), n


def test_bad_targets_are_named():
    model = _llama()
    with pytest.raises(ValueError, match=r"\['q_proj', 'layers\.9\.\*'\].*layers\.\*\.attn\.wq"):
        apply_lora(model, ["wq", "q_proj", "layers.9.*"])
    tied = GPT(GPTConfig(vocab_size=99, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tied, ["lm_head"])
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0)


# ---- interop with Hugging Face PEFT -----------------------------------------------------

# a module-level importorskip would skip the tests above too, so each interop test is marked
try:
    import peft
    import transformers as tf
except ImportError:
    peft = tf = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft and transformers are needed for the PEFT interop tests")

PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def hf_llama_folder(tmp_path):
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@needs_peft
def test_peft_adapter_loads_into_ours(hf_llama_folder, tmp_path):
    hf = tf.LlamaForCausalLM.from_pretrained(hf_llama_folder).eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    ours = models.from_pretrained(hf_llama_folder, backend="torch")
    load_adapter(ours, tmp_path / "peft")
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_modules(ours)) == sorted(LLAMA_TARGETS * 2)
    ids = _ids()
    theirs = _hf_logits(pm.eval(), ids)
    with torch.no_grad():
        diff = (ours(ids) - theirs).abs().max().item()
    print(f"PEFT -> ours: max |logit diff| {diff:.2e}")
    with pm.disable_adapter():  # get_peft_model injected the layers into hf itself
        assert (theirs - _hf_logits(pm, ids)).abs().max() > 1e-3  # the adapter changes the logits
    assert diff < 1e-5, diff
    # our own save of the same adapter uses exactly PEFT's tensor names and values
    save_adapter(ours, tmp_path / "ours")
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@needs_peft
def test_our_adapter_loads_into_peft(hf_llama_folder, tmp_path):
    ours = models.from_pretrained(hf_llama_folder, backend="torch")
    apply_lora(ours, LLAMA_TARGETS, r=4, alpha=8, use_rslora=True)
    _randomize(ours)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(hf_llama_folder))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(PEFT_TARGETS) and cfg["peft_type"] == "LORA" and cfg["use_rslora"]
    hf = tf.LlamaForCausalLM.from_pretrained(hf_llama_folder).eval()
    ids = _ids()
    base = _hf_logits(hf, ids)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    theirs = _hf_logits(pm, ids)
    with torch.no_grad():
        diff = (ours(ids) - theirs).abs().max().item()
    assert (theirs - base).abs().max() > 1e-3  # the adapter did change PEFT's model
    print(f"ours -> PEFT: max |logit diff| {diff:.2e}")
    assert diff < 1e-5, diff


@needs_peft
def test_partial_targets_and_gpt2_round_trip(tmp_path):
    """Only layer 0's wq: full module names in target_modules; GPT-2's Conv1D via fan_in_fan_out."""
    ours = _llama()
    apply_lora(ours, ["layers.0.attn.wq"], r=2, alpha=2)
    save_adapter(ours, tmp_path / "one")
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["target_modules"] == \
        ["model.layers.0.self_attn.q_proj"]
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, bos_token_id=0, eos_token_id=0, n_positions=32, n_embd=32,
                                          n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    gpt = models.from_pretrained(tmp_path / "gpt2", backend="torch")
    apply_lora(gpt, ["c_attn", "mlp.c_proj"], r=4, alpha=8)
    _randomize(gpt)
    save_adapter(gpt, tmp_path / "gpt2_lora")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "gpt2_lora").eval()
    ids = _ids()
    with torch.no_grad():
        diff = (gpt(ids) - _hf_logits(pm, ids)).abs().max().item()
    print(f"GPT-2 ours -> PEFT: max |logit diff| {diff:.2e}")
    assert diff < 1e-5, diff
    fresh = models.from_pretrained(tmp_path / "gpt2", backend="torch")
    load_adapter(fresh, tmp_path / "gpt2_lora")
    with torch.no_grad():
        assert torch.equal(fresh(ids), gpt(ids))
    with pytest.raises(ValueError, match="does not fit Llama"):
        load_adapter(_llama(), tmp_path / "gpt2_lora")
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    save_file({k: v for k, v in one.items() if "lora_A" in k}, str(tmp_path / "one" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B"):
        load_adapter(_llama(), tmp_path / "one")


def test_triton_backend_gives_the_same_outputs_and_gradients():
    """With the model's backend set to triton, LoRALinear runs ltk/kernels/lora.py's fused kernel
    (the interpreter on a CPU): the same outputs and LoRA gradients as the torch path."""
    import torch.nn as nn

    from ltk.models.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(24, 17)
    a, b = LoRALinear(base, r=4, backend="torch"), LoRALinear(nn.Linear(24, 17), r=4, backend="triton")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.lora_B.normal_()
        b.lora_B.copy_(a.lora_B)
    x = torch.randn(3, 5, 24)
    ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-5
    ya.square().sum().backward()
    yb.square().sum().backward()
    for n in ("lora_A", "lora_B"):
        assert (getattr(a, n).grad - getattr(b, n).grad).abs().max() <= 1e-4 * getattr(a, n).grad.abs().max()
