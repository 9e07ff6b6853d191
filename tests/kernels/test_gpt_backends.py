"""One setting switches GPT between PyTorch's ops and our Triton kernels (run here by the
interpreter, fp32): same logits, same gradients, and the same 20-step training curve."""
import json

import pytest
import torch

from ltk.models.gpt import GPT, GPTConfig, gpt_config
from ltk.training.presets import get_preset
from ltk.training.trainer import Trainer


def test_forward_and_gradients_match_across_backends():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=32, backend="torch")
    ref = GPT(cfg)
    tri = GPT(GPTConfig(**{**cfg.__dict__, "backend": "triton"}))
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 101, (2, 19))  # not a multiple of any block size
    out_ref, out_tri = ref(idx), tri(idx)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().mean().backward()
    out_tri.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_triton_backend_refuses_attention_dropout_in_training():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1, backend="triton"))
    with pytest.raises(ValueError, match="attention dropout"):
        m(torch.zeros(1, 8, dtype=torch.long))
    m.eval()
    assert m(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 50)  # no dropout at inference


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="model.backend"):
        gpt_config("gpt-debug", vocab_size=10, backend="cuda").validate()


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gpt_debug_trains_the_same_20_steps_on_both_backends(tiny_corpus, tmp_path):
    losses = {}
    for backend in ("torch", "triton"):
        cfg = get_preset("gpt-debug")
        cfg.model.backend = backend
        cfg.data.source, cfg.data.vocab_size, cfg.data.min_chars = str(tiny_corpus), 300, 16
        t = cfg.trainer
        t.max_steps, t.batch_size, t.seq_len, t.eval_every, t.eval_batches = 20, 2, 32, 0, 1
        t.log_every, t.progress, t.out_dir = 1, False, str(tmp_path / backend)
        Trainer(cfg).fit()
        losses[backend] = _losses(tmp_path / backend)
    assert len(losses["torch"]) == 20
    diffs = [abs(a - b) for a, b in zip(losses["torch"], losses["triton"])]
    assert max(diffs) < 1e-4, diffs
    assert losses["torch"][-1] < losses["torch"][0] - 1.0  # it did learn


def test_llama_and_t5_feed_forward_match_across_backends(monkeypatch):
    """Llama (RMSNorm, attention, RoPE in place on q and k, SwiGLU) and T5 1.1's GeGLU
    feed-forward on the triton backend: the torch backend's logits and every parameter's gradient,
    fp32, with packed sequences (RoPE positions restarting per example: per-sequence cos/sin)."""
    import ltk.kernels.rope as rope_mod
    import ltk.kernels.swiglu as swiglu_mod
    from ltk.models.llama import Llama, LlamaConfig
    from ltk.models.t5 import T5Config, T5FeedForward

    calls = {"rope": 0, "glu": 0}
    launch, grid = rope_mod._launch, swiglu_mod._launch_grid

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(rope_mod, "_launch", count("rope", launch))
    monkeypatch.setattr(swiglu_mod, "_launch_grid", count("glu", grid))

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, block_size=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=48, rope_theta=10000.0, backend="torch")
    ref = Llama(cfg)
    with torch.no_grad():  # logits of order 1
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    tri = Llama(LlamaConfig(**{**cfg.__dict__, "backend": "triton"}))
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 61, (2, 11))
    segments = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    out_ref, out_tri = ref(idx, segments=segments), tri(idx, segments=segments)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().mean().backward()
    out_tri.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert calls == {"rope": 4, "glu": 2}  # forward and backward, on the triton model only (RoPE: q, k apart)

    t5cfg = T5Config(d_model=24, d_ff=40, feed_forward="gated-gelu", backend="torch")
    ff_ref = T5FeedForward(t5cfg)
    ff_tri = T5FeedForward(T5Config(**{**t5cfg.__dict__, "backend": "triton"}))
    ff_tri.load_state_dict(ff_ref.state_dict())
    x = torch.randn(3, 5, 24)
    y_ref, y_tri = ff_ref(x), ff_tri(x)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.square().sum().backward()
    y_tri.square().sum().backward()
    for (name, p), q in zip(ff_ref.named_parameters(), ff_tri.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert calls["glu"] == 4
