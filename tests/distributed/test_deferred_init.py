"""Deferred initialization (ltk/models/init.py): a model built with its parameters on the meta
device and materialized shard by shard under ZeRO-3, tensor and pipeline parallelism holds
exactly the weights of the same model built whole on one process, and no rank holds more
than its shard once the engine is built."""
from __future__ import annotations

import torch

from ltk.models.gpt import GPT
from ltk.models.init import build_on_meta, is_on_meta, materialize, materialized
from ltk.models.llama import Llama, LlamaConfig
from ltk.parallel.dist import Comm, spawn
from ltk.parallel.reference import make_optimizer, tiny_gpt_config


def _cfg():
    return tiny_gpt_config(n_layer=4)


def _whole(seed: int = 3) -> GPT:
    torch.manual_seed(seed)
    return GPT(_cfg())


def _meta(seed: int = 3) -> GPT:
    torch.manual_seed(seed)
    return build_on_meta(lambda: GPT(_cfg()))


def test_meta_build_materializes_to_the_whole_model_and_keeps_the_tie():
    for cls, cfg in ((GPT, _cfg()), (Llama, LlamaConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4,
                                                        n_kv_head=2, n_embd=32))):
        torch.manual_seed(7)
        whole = cls(cfg)
        after = torch.rand(())  # the global RNG after building
        torch.manual_seed(7)
        meta = build_on_meta(lambda: cls(cfg))
        assert all(p.is_meta for p in meta.parameters())
        one = materialized(next(meta.parameters()))
        assert not one.is_meta and next(meta.parameters()).is_meta  # a value made, the parameter untouched
        materialize(meta)
        assert not is_on_meta(meta)
        for (n, a), (m, b) in zip(whole.state_dict().items(), meta.state_dict().items()):
            assert n == m and torch.equal(a, b), n
        if cls is GPT:
            assert meta.lm_head.weight is meta.wte.weight
            torch.manual_seed(7)
            with torch.random.fork_rng(devices=[]):
                build_on_meta(lambda: cls(cfg))
            GPT(cfg)
            assert torch.equal(torch.rand(()), after)  # a fork leaves the stream as a whole build does


def test_a_parameter_value_does_not_depend_on_the_others():
    a = _whole(1)
    b = GPT(tiny_gpt_config(n_layer=4, n_embd=32, vocab_size=96))  # another draw of the seed: other values
    assert not torch.equal(a.h[0].attn.c_attn.weight, b.h[0].attn.c_attn.weight)
    c = _meta(1)
    w = materialized(c.get_parameter("h.3.mlp.c_fc.weight"))  # alone, without its neighbours
    assert torch.equal(w, a.get_parameter("h.3.mlp.c_fc.weight"))


def _worker(rank: int, world: int) -> dict:
    from ltk.parallel.pipeline import rank_stages
    from ltk.parallel.tp_plan import apply_tensor_parallel, gather_tp_params
    from ltk.parallel.zero3 import Zero3Engine

    ref = _whole().state_dict()
    out = {}
    # ZeRO-3: each rank makes its shards; the gathered state is the whole model's
    model = _meta()
    eng = Zero3Engine(model, model.param_groups(0.1), lambda g: make_optimizer(g, 1e-3), Comm())
    assert not is_on_meta(model)
    full = eng.full_state_dict()
    out["zero3_equal"] = all(torch.equal(full[k], ref[k]) for k in ref)
    out["zero3_bytes"] = eng.state_bytes()["params"]  # shards only: every unit's full buffer is freed
    out["numel"] = sum(v.numel() for k, v in ref.items() if k != "lm_head.weight")
    # one training step equals the whole-built engine's
    whole = _whole()
    eng2 = Zero3Engine(whole, whole.param_groups(0.1), lambda g: make_optimizer(g, 1e-3), Comm())
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(rank))
    for e in (eng, eng2):
        e(x).float().pow(2).mean().backward()
        e.step()
    a, b = eng.full_state_dict(), eng2.full_state_dict()
    out["zero3_step_equal"] = all(torch.equal(a[k], b[k]) for k in a)
    # tensor parallel: the cut of a meta model is the cut of the whole one
    tp = apply_tensor_parallel(_meta(), Comm())
    assert not is_on_meta(tp)
    gathered = gather_tp_params(tp)
    out["tp_equal"] = all(torch.equal(gathered[k], ref[k]) for k in gathered)
    # pipeline: this rank's stages only
    stages = rank_stages(_meta(), rank, world)
    whole_stages = rank_stages(_whole(), rank, world)
    out["pp_equal"] = all(torch.equal(p, q) for s, t in zip(stages, whole_stages)
                          for p, q in zip(s.state_dict().values(), t.state_dict().values()))
    return out


def test_sharded_builds_equal_the_whole_model_at_two_ranks():
    for r in spawn(_worker, 2, timeout_s=200):
        assert r["zero3_equal"] and r["zero3_step_equal"] and r["tp_equal"] and r["pp_equal"]
        # fp32 shards of Ψ/2 each (plus padding): far below one whole copy
        assert r["zero3_bytes"] <= 4 * (r["numel"] / 2 + 64 * 8)
