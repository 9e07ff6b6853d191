"""ltk/parallel/cost_cp.py, and context parallelism in ltk/parallel/plan.py and simulator.py: the
formulas against hand counts on tiny shapes, cp = 1 equal to the plan without CP, the causal work
per rank of the contiguous and zig-zag splits, and the simulator's overlap."""
import json
import math

import pytest

from ltk.cli import main
from ltk.models.gpt import GPTConfig
from ltk.models.llama import LlamaConfig
from ltk.parallel import cost, cost_cp
from ltk.parallel.cluster import Cluster
from ltk.parallel.plan import plan
from ltk.parallel.simulator import Strategy, memory_per_device, simulate
from ltk.parallel.simulator_cp import all_to_all_time, ring_layer_exposed

GPT = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64)
LLAMA = LlamaConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                    intermediate_size=128)
# B = 1, T = 16, H = 4, H_kv = 2 (GQA), D = 8, L = 3, e = 2 (bf16), e_g = 4 (fp32 dK/dV)
SHAPE = dict(seq=16, batch=1, heads=4, kv_heads=2, head_dim=8, layers=3, dtype_bytes=2, dkv_bytes=4)


@pytest.mark.parametrize("cp, want", [
    # S_kv = 2·B·(T/c)·H_kv·D: c=2 → 256, c=4 → 128 elements; per layer forward (c-1)·S_kv·2,
    # backward (c-1)·S_kv·2 for K, V and c·S_kv·4 for the dK/dV that travel home; 3 layers
    (2, 3 * (1 * 256 * 2 + 1 * 256 * 2 + 2 * 256 * 4)),
    (4, 3 * (3 * 128 * 2 + 3 * 128 * 2 + 4 * 128 * 4)),
])
def test_ring_bytes_are_the_hand_count(cp, want):
    assert cost_cp.comm_bytes(cp=cp, impl="ring", **SHAPE) == {"send": want}
    s_kv = 2 * 16 // cp * 2 * 8
    assert cost_cp.comm_bytes(cp=cp, impl="ring", recompute=True, **SHAPE) == {"send": want + 3 * (cp - 1) * s_kv * 2}
    assert cost.wire_bytes({"send": want}, cp) == want  # point to point: payload = wire
    # the K/V in flight (2 shards, bf16) and the dK/dV in flight (2 shards, fp32)
    assert cost_cp.peak_buffer_bytes(16, 1, 4, 2, 8, cp, "ring", dtype_bytes=2, dkv_bytes=4) == 2 * s_kv * (2 + 4)


@pytest.mark.parametrize("cp, q, kv", [
    (2, 1 * 8 * 4 * 8, 1 * 8 * 2 * 8),  # Q, O: B·(T/c)·H·D = 256; K, V: B·(T/c)·H_kv·D = 128
    (4, 1 * 4 * 4 * 8, 1 * 4 * 4 * 8),  # H_kv = 2 < c = 4: one K/V head per rank, the local K holds c of them
])
def test_ulysses_bytes_are_the_hand_count(cp, q, kv):
    want = 3 * 2 * (2 * q + 2 * kv) * 2  # 3 layers x (forward, backward) x 4 all-to-alls x bf16
    got = cost_cp.comm_bytes(cp=cp, impl="ulysses", **SHAPE)
    assert got == {"all_to_all": want}
    assert cost.wire_bytes(got, cp) == pytest.approx(want * (cp - 1) / cp)
    q_heads, kv_heads = 4 // cp, math.ceil(2 / cp)  # head-sharded over the whole sequence
    assert cost_cp.peak_buffer_bytes(16, 1, 4, 2, 8, cp, "ulysses", dtype_bytes=2) == 16 * 8 * (2 * q_heads +
                                                                                                2 * kv_heads) * 2


def test_tensor_parallel_splits_the_kv_heads_of_the_ring():
    one, two = (cost_cp.comm_bytes(cp=2, impl="ring", tp=t, **SHAPE)["send"] for t in (1, 2))
    assert two * 2 == one
    assert cost_cp.comm_bytes(cp=1, impl="ring", **SHAPE) == {} and cost_cp.peak_buffer_bytes(16, 1, 4, 2, 8, 1,
                                                                                              "ring") == 0


def test_padding():
    assert [cost_cp.padded_seq_len(10, c, "ring") for c in (1, 2, 4)] == [10, 12, 16]  # multiples of 2c
    # one sharding for every split and implementation (context_parallel.padded_length): 2c chunks
    assert [cost_cp.padded_seq_len(10, c, "ulysses") for c in (1, 2, 4)] == [10, 12, 16]
    assert cost_cp.padded_seq_len(10, 4, "ring", split="contiguous") == 16
    from ltk.parallel.context_parallel import padded_length
    assert all(cost_cp.padded_seq_len(t, c) == padded_length(t, c) for t in (7, 10, 64, 101) for c in (2, 3, 4))


@pytest.mark.parametrize("cp", [2, 3, 4, 8])
def test_zigzag_is_balanced_and_contiguous_is_2c_minus_1_over_c(cp):
    for chunks in (2 * cp, 4 * cp):
        zz = cost_cp.score_blocks(cp, chunks, "zigzag")
        assert len(set(zz)) == 1 and sum(zz) == chunks * chunks / 2  # the causal half of chunks² blocks
    for chunks in (cp, 2 * cp):
        ct = cost_cp.score_blocks(cp, chunks, "contiguous")
        assert cost_cp.imbalance(ct) == pytest.approx((2 * cp - 1) / cp)
        assert ct == sorted(ct) and sum(ct) == chunks * chunks / 2
    assert cost_cp.score_blocks(2, 2, "contiguous") == [0.5, 1.5]
    assert cost_cp.score_blocks(2, 4, "zigzag") == [0.5 + 3.5, 1.5 + 2.5]  # chunks (0, 3) and (1, 2)
    assert cost_cp.score_blocks(2, 4, "zigzag", diagonal=1.0) == [5.0, 5.0]
    with pytest.raises(ValueError, match="multiple of 4"):
        cost_cp.score_blocks(2, 6, "zigzag")


def test_cp_1_plan_is_the_plan_without_cp():
    """No regression: Korthikanti's layers at T plus the fp32 logits, no CP key anywhere."""
    p = plan("llama", LLAMA, world=2, strategy="zero2", batch=4, seq_len=64, dtype="bf16")
    layer = cost.activation_bytes_per_layer(64, 2, 64, 4, flash=True)
    assert p["activations"] == int(layer * 4 + 2 * 64 * 256 * 4)
    assert p["mesh"] == {"dp": 2, "tp": 1, "pp": 1} and "context_parallel" not in p
    assert set(p["comm"]) == {"data_parallel"}
    assert plan("llama", LLAMA, world=2, strategy="zero2", batch=4, seq_len=64, dtype="bf16", cp=1) == p


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_cp_2_halves_the_activations_up_to_the_buffers_and_shards_over_dp_x_cp(impl):
    one = plan("llama", LLAMA, world=1, strategy="zero3", batch=1, seq_len=64, dtype="bf16")
    two = plan("llama", LLAMA, world=2, strategy="zero3", batch=1, seq_len=64, dtype="bf16", cp=2, cp_impl=impl)
    c = two["context_parallel"]
    assert c["tokens_per_rank"] == 32 and c["buffers"] > 0 and two["mesh"] == {"dp": 1, "tp": 1, "pp": 1, "cp": 2}
    assert two["activations"] - c["buffers"] == pytest.approx(one["activations"] / 2, abs=1)
    # parameters are replicated over cp: reduced (and ZeRO-sharded) over dp x cp = 2 ranks
    assert two["params"] == 2 * math.ceil(two["num_params_per_rank"] / 2) and two["comm"]["data_parallel"]
    assert two["comm"]["context_parallel"] == cost_cp.comm_bytes(64, 1, 4, 2, 16, 4, 2, impl, dtype_bytes=2)


def test_bad_cp_plans_are_named():
    with pytest.raises(ValueError, match=r"Ulysses splits the attention heads over cp x tp = 2 x 4 = 8 ranks.*4 heads"):
        plan("llama", LLAMA, world=8, tp=4, cp=2, cp_impl="ulysses", batch=1)
    with pytest.raises(ValueError, match=r"--tp x --pp x --cp = 4"):
        plan("gpt", GPT, world=6, cp=4, batch=1)
    with pytest.raises(ValueError, match="--cp 0"):
        plan("gpt", GPT, world=2, cp=0)
    with pytest.raises(ValueError, match="unknown context-parallel implementation 'striped'"):
        plan("gpt", GPT, world=2, cp=2, cp_impl="striped", batch=1)


def test_ltk_plan_cp_cli(capsys):
    assert main(["plan", "--preset", "llama-debug", "--world", "4", "--cp", "2", "--seq-len", "100", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["context_parallel"]["padded_seq_len"] == 100 and p["mesh"]["dp"] == 2
    assert main(["plan", "--preset", "llama-debug", "--world", "2", "--parallel.cp", "2", "--cp-impl", "ulysses",
                 "--seq-len", "101"]) == 0
    assert "context parallel: cp 2 (Ulysses all-to-all, heads split), 101 tokens (padded to 104)" in \
        capsys.readouterr().out


# == simulator ===============================================================================
FAST = Cluster("fast", 8, 1, 1e12, 2**34, 1e15, 0.0, 1e15, 0.0)  # ample bandwidth, no latency
SLOW = Cluster("slow", 8, 1, 1e12, 2**34, 1e6, 1e-6, 1e6, 1e-6)


def test_ring_overlap_rule():
    assert ring_layer_exposed(t_blk=2.0, t_send=1.0, t_kv=1.0, t_dkv=1.0, cp=4) == (0.0, 1.0)  # only dK/dV's last hop
    assert ring_layer_exposed(t_blk=1.0, t_send=3.0, t_kv=3.0, t_dkv=3.0, cp=4) == (3 * 2.0, 3 * 4.0 + 3.0)
    assert all_to_all_time(8e6, 4, FAST) == pytest.approx(3 / 4 * 8e6 / 1e15)


def test_simulator_cp_memory_falls_and_ring_hides_its_sends_on_ample_bandwidth():
    st = dict(global_batch=1, seq_len=64, dtype="bf16")
    acts = [memory_per_device(LLAMA, Strategy(cp=c, **st))["activations"] for c in (1, 2, 4)]
    assert acts[0] > acts[1] > acts[2]
    assert memory_per_device(LLAMA, Strategy(**st)) == memory_per_device(LLAMA, Strategy(cp=1, **st))
    for cluster in (FAST, SLOW):
        ring = simulate(LLAMA, cluster, Strategy(cp=4, **st))
        uly = simulate(LLAMA, cluster, Strategy(cp=2, cp_impl="ulysses", **st))
        for p in (ring, uly):
            assert p.step_time == pytest.approx(p.compute + sum(p.comm_exposed.values()) + p.bubble)
        assert uly.comm_exposed["context_parallel"] == pytest.approx(uly.comm_total["context_parallel"])
    fast = simulate(LLAMA, FAST, Strategy(cp=4, **st))
    slow = simulate(LLAMA, SLOW, Strategy(cp=4, **st))
    assert fast.comm_exposed["context_parallel"] < 1e-3 * fast.compute  # hidden under the attention
    assert slow.comm_exposed["context_parallel"] > slow.compute  # the link cannot keep up
    zz = simulate(LLAMA, FAST, Strategy(cp=4, **st))
    ct = simulate(LLAMA, FAST, Strategy(cp=4, cp_split="contiguous", **st))
    assert ct.compute > zz.compute and ct.memory == zz.memory


def test_a_cp_group_across_nodes_pays_the_network():
    """cp x tp = 8 ranks: one node of 8 (NVLink) or two nodes of 4 (the ring's hops at the NIC's pace)."""
    st = Strategy(cp=4, tp=2, global_batch=1, seq_len=64, dtype="bf16")
    one = simulate(LLAMA, Cluster("one", 8, 1, 1e12, 2**34, 1e9, 1e-6, 1e7, 1e-5), st)
    two = simulate(LLAMA, Cluster("two", 4, 2, 1e12, 2**34, 1e9, 1e-6, 1e7, 1e-5), st)
    assert two.comm_total["context_parallel"] > 10 * one.comm_total["context_parallel"]
    assert two.compute == one.compute
