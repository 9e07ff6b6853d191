"""Llama: parity with transformers both ways, the KV cache, sampling, strict conversion,
parameter counts and the Triton backend."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from ltk.models.generate import filter_logits, generate  # noqa: E402
from ltk.models.hf.llama import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf  # noqa: E402
from ltk.models.llama import Llama, LlamaConfig, flops_per_token, llama_config, num_params  # noqa: E402

V = 101


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is fastest, and spares the tests from OpenMP
    threads spinning against each other on a busy machine (100x slower matmuls)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _hf_model(n_kv_head: int, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=64,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.1,  # larger than the default 0.02: logits of order 1, not 1e-2
    )
    hf_cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norm gains too, so a misplaced norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _ours_from_hf(hf) -> Llama:
    cfg = config_from_hf(hf.config.to_dict())
    cfg.backend = "torch"
    model = Llama(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    return model


@pytest.mark.parametrize("n_kv_head", [2, 4], ids=["gqa", "mha"])
def test_logits_match_transformers_loading_hf_weights(n_kv_head):
    hf = _hf_model(n_kv_head)
    ours = _ours_from_hf(hf)
    idx = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("n_kv_head", [2, 4], ids=["gqa", "mha"])
def test_logits_match_transformers_exporting_our_weights(n_kv_head):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                      intermediate_size=160, rope_theta=10000.0, norm_eps=1e-6, backend="torch")
    ours = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():  # logits of order 1, random norm gains
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=True)
    assert not missing and not unexpected
    idx = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_tied_embeddings_round_trip():
    hf = _hf_model(2, tie=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # as safetensors store it
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.tie_embeddings
    ours = Llama(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(sd, cfg))
    assert ours.output.weight is ours.tok_embeddings.weight
    idx = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-5
    back = state_dict_to_hf(ours.state_dict(), cfg)
    assert torch.equal(back["lm_head.weight"], hf.state_dict()["model.embed_tokens.weight"])


def test_kv_cache_greedy_equals_uncached_and_transformers():
    hf = _hf_model(2, seed=3)
    ours = _ours_from_hf(hf)
    prompt = torch.randint(0, V, (2, 5))
    cached = generate(ours, prompt, 20, block_size=64, temperature=0, use_cache=True)
    uncached = generate(ours, prompt, 20, block_size=64, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                         eos_token_id=None, pad_token_id=0)
    assert theirs.shape == cached.shape
    assert torch.equal(cached, theirs)


def test_kv_cache_logits_and_sliding_window():
    torch.manual_seed(0)
    cfg = llama_config("llama-debug", vocab_size=V, block_size=32, backend="torch")
    model = Llama(cfg).eval()
    idx = torch.randint(0, V, (3, 12))
    with torch.no_grad():
        full = model(idx)
        assert torch.equal(model(idx, positions=torch.arange(12).expand(3, 12)), full)
        cache = model.new_cache(3, 16)
        parts = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="KV cache holds 16"):
        model(idx[:, :5], kv_cache=cache)
    # past the window (block_size=16 here) the cached path restarts; same tokens as uncached
    a = generate(model, idx[:, :10], 12, block_size=16, temperature=0, use_cache=True)
    b = generate(model, idx[:, :10], 12, block_size=16, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_sampling_controls():
    torch.manual_seed(0)
    model = Llama(llama_config("llama-debug", vocab_size=V, backend="torch"))
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(model, prompt, 8, block_size=128, temperature=0)
    tiny_p = generate(model, prompt, 8, block_size=128, temperature=1.0, top_k=None, top_p=1e-6,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, tiny_p)
    top1 = generate(model, prompt, 8, block_size=128, temperature=1.0, top_k=1)
    assert torch.equal(greedy, top1)
    runs = [generate(model, prompt, 8, block_size=128, temperature=1.5, top_k=None, top_p=0.9,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)
    # the filters themselves: top-p keeps the smallest set reaching the mass
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_p=0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_k=3).isfinite().sum() == 3
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 1, block_size=128, top_p=0.0)


def test_stop_tokens_finish_each_sequence():
    torch.manual_seed(0)
    model = Llama(llama_config("llama-debug", vocab_size=V, backend="torch"))
    prompt = torch.randint(0, V, (2, 4))
    free = generate(model, prompt, 10, block_size=128, temperature=0)
    first = int(free[0, 4])
    out = generate(model, prompt, 10, block_size=128, temperature=0, stop_tokens={first})
    assert out[0, 4] == first and torch.all(out[0, 4:] == first)
    if first not in free[1, 4:].tolist():
        assert out.size(1) == free.size(1) and torch.equal(out[1], free[1])


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
])
def test_unsupported_hf_configs_are_rejected_by_name(field, value):
    d = config_to_hf(llama_config("llama-debug", vocab_size=V))
    d[field] = value
    with pytest.raises(ValueError, match=field):
        config_from_hf(d)


@pytest.mark.parametrize("field, value, match", [
    ("n_kv_head", 3, "n_kv_head"), ("n_embd", 100, "n_head"), ("vocab_size", 0, "vocab_size"),
    ("backend", "cuda", "backend"), ("rope_theta", 0.0, "rope_theta"),
])
def test_bad_configs_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        Llama(llama_config("llama-debug", **{"vocab_size": V, field: value}))


def test_strict_conversion_names_the_tensor():
    cfg = llama_config("llama-debug", vocab_size=V, n_layer=2)
    sd = state_dict_to_hf(Llama(cfg).state_dict(), cfg)
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        state_dict_from_hf(bad, cfg)
    bad = dict(sd, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)})
    with pytest.raises(ValueError, match=r"unexpected: model\.layers\.0\.self_attn\.q_proj\.bias"):
        state_dict_from_hf(bad, cfg)
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(128, 128)})
    with pytest.raises(ValueError, match=r"wrong shape: model\.layers\.0\.self_attn\.k_proj\.weight"):
        state_dict_from_hf(bad, cfg)
    ours = Llama(cfg).state_dict()
    del ours["norm.weight"]
    with pytest.raises(ValueError, match=r"missing: norm\.weight"):
        state_dict_to_hf(ours, cfg)


@pytest.mark.parametrize("name", ["llama-debug", "llama-1b", "llama-8b"])
def test_num_params_matches_the_module(name):
    cfg = llama_config(name, **({"vocab_size": 1000} if name == "llama-debug" else {}))
    with torch.device("meta"):
        model = Llama(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    if name == "llama-8b":
        assert num_params(cfg) == 8_030_261_248  # Llama-3-8B as published
        matmul = num_params(cfg) - 128256 * 4096 - (2 * 32 + 1) * 4096
        assert flops_per_token(cfg, 2048) == 6 * matmul + 12 * 32 * 4096 * 2048
    if name == "llama-1b":
        assert num_params(cfg) == 1_235_814_400  # Llama-3.2-1B (tied)


def test_triton_backend_matches_torch_backend():
    from ltk.kernels.backend import interpreter_on

    if not torch.cuda.is_available() and not interpreter_on():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=64, rope_theta=10000.0, backend="torch")
    ref = Llama(cfg).to(device).eval()
    with torch.no_grad():  # logits of order 1
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    tri = Llama(LlamaConfig(**{**cfg.__dict__, "backend": "triton"})).to(device).eval()
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, V, (2, 9), device=device)
    with torch.no_grad():
        expected = ref(idx)
        assert (tri(idx) - expected).abs().max().item() < 1e-5
        cache = tri.new_cache(2, 16)  # the decode steps (T=1 < S) through the triton kernel
        steps = [tri(idx[:, :6], kv_cache=cache)] + [tri(idx[:, t:t + 1], kv_cache=cache) for t in (6, 7, 8)]
        assert (torch.cat(steps, dim=1) - expected).abs().max().item() < 1e-5


def test_llama_debug_learns_a_repeated_sequence():
    torch.manual_seed(0)
    model = Llama(llama_config("llama-debug", vocab_size=V, n_layer=2, backend="torch"))
    model.activation_checkpointing = True
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3)
    data = torch.randint(0, V, (4, 33))
    losses = []
    for _ in range(25):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_load_a_local_hf_folder(tmp_path):
    """config.json + *.safetensors, as save_pretrained (or the Hub) writes them."""
    import json

    from safetensors.torch import load_file

    hf = _hf_model(2)
    hf.save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    cfg.backend = "torch"
    tensors = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        tensors.update(load_file(f))
    model = Llama(cfg).eval()
    model.load_state_dict(state_dict_from_hf(tensors, cfg))
    idx = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5
