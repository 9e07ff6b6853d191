"""Packed instruction batches: every example placed once and intact, never more slots than
padding; each example's logits in a packed row equal its logits alone (GPT and Llama), and the
loss and gradients of a packed batch equal those of the padded batch of the same examples;
`ltk finetune --packing` trains on the same examples as the padded stream, with the same losses."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ltk.models.gpt import GPT, GPTConfig, segment_positions
from ltk.models.llama import Llama, LlamaConfig
from ltk.training.finetune import FinetuneConfig, run_finetune
from ltk.training.instruct import IGNORE_INDEX, Example, batches
from ltk.training.objectives import causal_loss
from ltk.training.packing import PAD_SEGMENT, pack_batch, pack_examples, packed_batches, real_tokens
from ltk.training.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


@pytest.fixture(scope="module")
def tok():
    """vocab 257: no merges, every byte of text is one token (lengths are easy to vary)."""
    return Tokenizer.train_bpe(["abcdefxy"], 257)


def examples(n: int, seed: int = 0) -> list[Example]:
    """Short instructions of uneven lengths (about 10 to 60 tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(1, 6, (1,), generator=g)),),
                                                     generator=g)]
        out.append(Example(f"Repeat: {' '.join(words)}\n", " ".join(words[::-1])))
    return out


def fake_encoded(lengths):
    """(ids, labels) pairs with recognizable contents: example i's ids are all i."""
    return [([i] * n, [IGNORE_INDEX] * (n - 1) + [1000 + i]) for i, n in enumerate(lengths)]


# -- the packing itself ----------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=24), slack=st.integers(0, 50))
def test_each_example_once_and_intact_rows_fit_never_more_slots_than_padding(lengths, slack):
    max_len = max(lengths) + slack
    encoded = fake_encoded(lengths)
    p = pack_examples(encoded, max_len)
    assert sorted(i for row in p.rows for i in row) == list(range(len(lengths)))
    assert p.width <= max_len and len(p.rows) * p.width <= len(lengths) * max(lengths)
    x, y, seg = pack_batch(encoded, max_len, pad_id=-7)
    assert x.shape == (len(p.rows), p.width) and x.dtype == y.dtype == seg.dtype == torch.long
    assert real_tokens(y, seg) == sum(lengths) and p.efficiency == sum(lengths) / x.numel()
    for r, row in enumerate(p.rows):
        t = 0
        for s, i in enumerate(row):  # the example sits whole, labels and all, under segment id s
            n = lengths[i]
            assert x[r, t:t + n].tolist() == encoded[i][0] and y[r, t:t + n].tolist() == encoded[i][1]
            assert (seg[r, t:t + n] == s).all()
            t += n
        assert (x[r, t:] == -7).all() and (y[r, t:] == IGNORE_INDEX).all() and (seg[r, t:] == PAD_SEGMENT).all()


def test_rows_are_filled_and_bad_input_is_named():
    # 8 examples of 30 tokens in rows of 64: 4 rows of two, no padding at all
    p = pack_examples(fake_encoded([30] * 8), 64)
    assert len(p.rows) == 4 and p.width == 60 and p.efficiency == 1.0
    # the padded batch would be 10 x 50 slots; packed: 3 rows of 52..58 tokens
    p = pack_examples(fake_encoded([50, 8, 40, 12, 30, 20, 6, 2, 4, 10]), 64)
    assert len(p.rows) * p.width < 10 * 50 and p.efficiency > 0.9
    with pytest.raises(ValueError, match="more than max_len=10"):
        pack_examples(fake_encoded([3, 11]), 10)
    with pytest.raises(ValueError, match="at least one example"):
        pack_examples([], 10)


def test_packed_stream_visits_the_padded_streams_examples(tok):
    """Same epochs, same seeded runs: batch for batch the same examples (by their tokens)."""
    exs = examples(23)
    padded = batches(exs, tok, 5, 64, seed=3, epochs=2)
    packed = packed_batches(exs, tok, 5, 64, seed=3, epochs=2)
    n = 0
    for (x, y), (xp, yp, seg) in zip(padded, packed, strict=True):
        mine = sorted(tuple(x[r, :len(y[r]) - int((y[r] != IGNORE_INDEX).flip(0).int().argmax())].tolist())
                      for r in range(len(x)))
        theirs = sorted(tuple(xp[r][seg[r] == s].tolist()) for r in range(len(xp)) for s in seg[r].unique()
                        if s != PAD_SEGMENT)
        assert mine == theirs and xp.shape[0] <= x.shape[0] and real_tokens(y) == real_tokens(yp, seg)
        n += 1
    assert n == 2 * 5  # ceil(23 / 5) runs per epoch


def test_segment_positions_restart_per_run():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1], [0] * 10])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1], list(range(10))]


# -- the models: packed == alone ---------------------------------------------------------------

def tiny_gpt(backend="torch"):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32, backend=backend))


def tiny_llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=257, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=48, rope_theta=10000.0, backend="torch"))


def one_packed_and_one_padded_batch(tok, n=9, max_len=64):
    exs = examples(n, seed=1)
    (xp, yp, seg), = packed_batches(exs, tok, n, max_len, shuffle=False, epochs=1)
    (x, y), = batches(exs, tok, n, max_len, shuffle=False, epochs=1)
    assert xp.shape[0] < n  # several examples do share rows
    return exs, (xp, yp, seg), (x, y)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
def test_each_examples_logits_in_a_packed_row_equal_its_logits_alone(tok, make):
    model = make().eval()
    exs, (xp, yp, seg), _ = one_packed_and_one_padded_batch(tok)
    with torch.no_grad():
        packed = model(xp, segments=seg)
        seen = 0
        for r in range(len(xp)):
            for s in seg[r].unique():
                if s == PAD_SEGMENT:
                    continue
                where = seg[r] == s
                alone = model(xp[r, where][None])[0]
                torch.testing.assert_close(packed[r, where], alone, rtol=0, atol=1e-5)
                seen += 1
    assert seen == len(exs)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama], ids=["gpt", "llama"])
def test_packed_loss_and_gradients_equal_the_padded_batchs(tok, make):
    """The strongest check: the same mean response loss and the same gradient for every
    parameter; the packed run goes through activation checkpointing as well."""
    _, (xp, yp, seg), (x, y) = one_packed_and_one_padded_batch(tok)
    model = make().train()
    loss = causal_loss(model, x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    loss_packed = causal_loss(model, xp, yp, seg)
    loss_packed.backward()
    assert abs(loss_packed.item() - loss.item()) < 1e-5
    for n, p in model.named_parameters():
        err = (p.grad - grads[n]).abs().max() / grads[n].abs().max().clamp_min(1e-12)
        assert err < 1e-5, f"{n}: relative gradient error {err:.2e}"


def test_llama_restarts_its_rope_positions_per_segment(tok):
    """With RoPE, q_m·k_n depends on m − n only, so inside the mask a shift of positions
    changes nothing but rounding, and the test above cannot see it: check the positions
    used, bit for bit."""
    model = tiny_llama().eval()
    _, (xp, _, seg), _ = one_packed_and_one_padded_batch(tok)
    with torch.no_grad():
        assert torch.equal(model(xp, segments=seg), model(xp, segments=seg, positions=segment_positions(seg)))


def test_triton_backend_keeps_packed_examples_apart(tok):
    """The same on the triton backend (kernels run in the interpreter on a CPU)."""
    from ltk.kernels.backend import HAS_TRITON, interpreter_on

    if not (HAS_TRITON and (torch.cuda.is_available() or interpreter_on())):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    model = tiny_gpt("triton").eval()
    exs = examples(4, seed=2)
    (xp, yp, seg), = packed_batches(exs, tok, 4, 64, shuffle=False, epochs=1)
    with torch.no_grad():
        packed = model(xp, segments=seg)
        for r in range(len(xp)):
            for s in seg[r].unique():
                where = seg[r] == s
                if s != PAD_SEGMENT:
                    torch.testing.assert_close(packed[r, where], model(xp[r, where][None])[0], rtol=0, atol=1e-5)


def test_gpt_dropout_path_keeps_packed_examples_apart():
    """Attention dropout runs through PyTorch's SDPA with a (B, 1, T, T) segment mask: with the
    same dropout draws, changing the first example leaves the second one's logits alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.2,
                          backend="torch")).train()
    seg = torch.tensor([[0] * 8 + [1] * 12])
    idx = torch.randint(0, 257, (1, 20))
    other = idx.clone()
    other[:, :8] = torch.randint(0, 257, (1, 8))
    outs = []
    for x in (idx, other):
        torch.manual_seed(1)  # the same dropout masks for both forwards
        outs.append(model(x, segments=seg))
    assert not torch.allclose(outs[0][:, :8], outs[1][:, :8])
    torch.testing.assert_close(outs[0][:, 8:], outs[1][:, 8:], rtol=0, atol=1e-6)


def test_models_refuse_bad_segments():
    gpt, llama = tiny_gpt(), tiny_llama()
    idx = torch.zeros(2, 8, dtype=torch.long)
    seg = torch.zeros(2, 8, dtype=torch.long)
    for m in (gpt, llama):
        with pytest.raises(ValueError, match="kv_cache"):
            m(idx, segments=seg, kv_cache=m.new_cache(2, 16))
        with pytest.raises(TypeError, match="int32 or int64"):
            m(idx, segments=seg.float())
        with pytest.raises(ValueError, match=r"shape of idx \(2, 8\)"):
            m(idx, segments=seg[:, :7])


# -- ltk finetune --packing (tiny_base: tests/conftest.py) ------------------------------------

def test_finetune_with_packing_takes_the_same_steps_in_fewer_slots(tiny_base, tmp_path):
    """Chat rows of uneven length: the packed run (`ltk finetune --packing`) sees the padded
    run's examples step by step, so its losses are the same; its batches hold more tokens per
    slot; the summary says so."""
    from ltk.cli import main

    rows = [{"messages": [{"role": "user", "content": f"Repeat {' '.join(WORDS[:k])}"},
                          {"role": "assistant", "content": " ".join(WORDS[:k])}]} for k in range(1, 12)] * 3
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    padded = run_finetune(FinetuneConfig(method="lora", base=str(tiny_base), data=str(data),
                                         out_dir=str(tmp_path / "pad"), steps=3, batch_size=8, max_len=96,
                                         eval_every=3, device="cpu"))
    assert main(["finetune", "--method", "lora", "--base", str(tiny_base), "--data", str(data), "--steps", "3",
                 "--batch-size", "8", "--max-len", "96", "--eval-every", "3", "--out", str(tmp_path / "pack"),
                 "--device", "cpu", "--packing"]) == 0
    packed = json.loads((tmp_path / "pack" / "summary.json").read_text())
    assert packed["packing"] is True and padded["packing"] is False
    assert 0 < padded["packing_efficiency"] < packed["packing_efficiency"] <= 1
    assert packed["batch_tokens"] < padded["batch_tokens"]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("pad", "pack")]
    for a, b in zip(*losses, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
