"""The fine-tuning benchmarks (nf4, lora, qlora-memory) on a CPU at tiny sizes: rows for the
providers that can run, figures from the kernels' cost models, CUDA-only providers named in
`.skipped` with their reason, every provider computing the same function, and the QLoRA
memory accounting checked against the bytes the tensors really hold."""
from __future__ import annotations

import inspect
import json
import math
import sys

import pytest
import torch

import ltk.bench.lora as bench_lora
import ltk.bench.nf4 as bench_nf4
import ltk.bench.qlora_memory as qm
from ltk.bench import BENCHMARKS, run_benchmark
from ltk.bench.sweep import timed_call

TINY_NF4 = dict(shapes="6x40x96,5x33x71", min_time=0.01, device="cpu")
TINY_LORA = dict(shapes="6x40x24,5x33x71", rank=4, min_time=0.01, device="cpu")
TINY_LLAMA = dict(n_embd=256, n_layer=2, n_head=4, intermediate_size=688, vocab_size=256, rank=4)


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _interpreter() -> bool:
    from ltk.kernels.backend import HAS_TRITON, interpreter_on

    return HAS_TRITON and interpreter_on()


def _extra(row) -> dict:
    return json.loads(row.extra)


# --- nf4 --------------------------------------------------------------------------------------

def test_nf4_rows_use_the_cost_model_and_name_skipped_providers():
    from ltk.kernels.nf4 import bytes_moved, flops

    rows = run_benchmark("nf4", **TINY_NF4)
    ran = {"ours-reference", "dense"} | ({"bitsandbytes"} if _installed("bitsandbytes") else set())
    assert {r.provider for r in rows} == ran
    assert len(rows) == len(ran) * 2 * 3  # providers × shapes × modes
    for r in rows:
        e = _extra(r)
        passes = 2 if r.mode == "fwd+bwd" else 1
        assert e["flops"] == passes * flops(e["M"], e["N"], e["K"])
        assert e["bytes"] == passes * bytes_moved(e["M"], e["N"], e["K"], dtype_bytes=4, blocksize=64)
        assert r.tflops == pytest.approx(e["flops"] / (r.median_ms * 1e-3) / 1e12) and r.tflops > 0
        assert r.gbps == pytest.approx(e["bytes"] / (r.median_ms * 1e-3) / 1e9)
        assert r.dtype == "fp32" and r.peak_mem_mb is None and 0 < r.p20_ms <= r.median_ms <= r.p80_ms
    skipped = rows.skipped_summary()
    assert "CUDA" in skipped["ours"] and "interpreter" in skipped["ours"]
    assert "CUDA" in skipped["torch.compile"]
    if "bitsandbytes" in ran:
        assert all(r.speedup is not None for r in rows)
        assert {r.speedup for r in rows if r.provider == "bitsandbytes"} == {1.0}


def test_nf4_bitsandbytes_missing_is_a_skip_not_an_error(monkeypatch):
    for name in ("bitsandbytes", "bitsandbytes.functional"):  # None in sys.modules: import raises
        monkeypatch.setitem(sys.modules, name, None)
    rows = run_benchmark("nf4", **{**TINY_NF4, "shapes": "4x8x64"}, modes="fwd")
    assert {r.provider for r in rows} == {"ours-reference", "dense"}
    assert rows.skipped_summary()["bitsandbytes"] == "bitsandbytes not installed"


def test_nf4_shape_parsing():
    assert bench_nf4.parse_shapes("4096x4096x4096, 1x2kx3") == [(4096, 4096, 4096), (1, 2048, 3)]
    for bad in ("4096x4096", "0x1x1", "axbxc", ""):
        with pytest.raises(ValueError, match="M×N×K"):
            bench_nf4.parse_shapes(bad)


def test_nf4_providers_agree():
    """ours (under the interpreter), the dequantize + F.linear path and bitsandbytes compute
    the same y = x·Ŵᵀ and dx from the same 4-bit weight; odd N·K (a padded last byte), K not
    a multiple of the block (blocks straddle rows)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 71, generator=g), 0.02 * torch.randn(33, 71, generator=g)
    packed, absmax = bench_nf4.quantize(w)
    wanted = ["ours-reference"] + (["ours"] if _interpreter() else []) + \
             (["bitsandbytes"] if _installed("bitsandbytes") else [])
    results = {}
    for p in wanted:
        forward, inputs = bench_nf4.build(p, x, w, packed, absmax)
        results[p] = (forward(), timed_call(forward, inputs, "bwd")()[0])
    assert len(results) == 3 or not (_interpreter() and _installed("bitsandbytes"))
    ref_y, ref_dx = results.pop("ours-reference")
    for p, (y, dx) in results.items():
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5, msg=p)
        torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5, msg=p)
    dense, _ = bench_nf4.build("dense", x, w, packed, absmax)  # the unquantized ceiling: near, not equal
    err = (dense() - ref_y).norm() / dense().norm()
    assert 0 < err < 0.2


@pytest.mark.skipif(not _installed("bitsandbytes"), reason="bitsandbytes not installed")
def test_our_nf4_bytes_equal_bitsandbytes():
    import bitsandbytes.functional as bf

    w = 0.02 * torch.randn(33, 71, generator=torch.Generator().manual_seed(4))
    packed, absmax = bench_nf4.quantize(w)
    qw, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed, qw.view(-1)) and torch.equal(absmax, state.absmax)


# --- lora -------------------------------------------------------------------------------------

def test_lora_rows_use_the_cost_model_and_name_skipped_providers():
    from ltk.kernels.lora import bytes_moved, flops

    rows = run_benchmark("lora", **TINY_LORA)
    ran = {"ours-reference"} | ({"peft"} if _installed("peft") else set())
    assert {r.provider for r in rows} == ran and len(rows) == len(ran) * 2 * 3
    for r in rows:
        e = _extra(r)
        assert e["r"] == 4 and e["scale"] == 32.0 / 4
        assert e["flops"] == flops(e["M"], e["N"], e["K"], 4, mode=r.mode)
        assert e["bytes"] == bytes_moved(e["M"], e["N"], e["K"], 4, dtype_bytes=4, bias=False, mode=r.mode)
        assert r.tflops == pytest.approx(e["flops"] / (r.median_ms * 1e-3) / 1e12) and r.tflops > 0
    skipped = rows.skipped_summary()
    assert "CUDA" in skipped["ours"] and "CUDA" in skipped["torch.compile"]


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        run_benchmark("lora", **TINY_LORA | {"rank": 0})


def test_lora_providers_agree():
    """y and the gradients of x, A and B are the same for every provider that runs here."""
    x, w, a, b = bench_lora.make_inputs(7, 40, 33, 3, torch.float32, torch.device("cpu"), seed=5)
    wanted = ["ours-reference"] + (["ours"] if _interpreter() else []) + (["peft"] if _installed("peft") else [])
    results = {}
    for p in wanted:
        forward, inputs = bench_lora.build(p, x, w, a, b, alpha=6.0)
        results[p] = (forward(), timed_call(forward, inputs, "bwd")())
    ref_y, ref_grads = results.pop("ours-reference")
    manual = x @ w.T + 2.0 * (x @ a.T) @ b.T  # s = alpha / r = 2
    torch.testing.assert_close(ref_y, manual, atol=1e-5, rtol=1e-5)
    assert len(ref_grads) == 3 and all(g.abs().sum() > 0 for g in ref_grads)
    for p, (y, grads) in results.items():
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5, msg=p)
        for name, g, rg in zip(("dx", "dA", "dB"), grads, ref_grads):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=f"{p} {name}")


# --- qlora-memory -------------------------------------------------------------------------------

def test_llama2_7b_shapes_and_parameter_count():
    from ltk.models.llama import LlamaConfig, num_params

    counts, one_block, rest = qm.llama_shapes(4096, 32, 32, 11008, 32000)
    assert counts == {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}
    assert [s for _, s in one_block] == [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    assert rest == 2 * 32000 * 4096 + 65 * 4096  # embedding, head, 2 norms a block + the final one
    cfg = LlamaConfig(n_embd=4096, n_layer=32, n_head=32, n_kv_head=32, intermediate_size=11008, vocab_size=32000)
    assert rest + sum(n * k * c for (n, k), c in counts.items()) == num_params(cfg) == 6_738_415_616


@pytest.mark.skipif(not (_installed("bitsandbytes") and _installed("peft")), reason="bitsandbytes and peft needed")
def test_qlora_memory_components():
    rows = run_benchmark("qlora-memory", **TINY_LLAMA)
    by = {(r.provider, r.shape): _extra(r)["bytes"] for r in rows}
    sides = ("ours", "bitsandbytes+peft")
    counts, _, rest = qm.llama_shapes(256, 2, 4, 688, 256)
    n_weights = sum(counts.values())
    for (n, k), c in counts.items():  # the same format: byte for byte the same storage
        nk = n * k
        codes = by[("ours", f"nf4 codes {n}x{k} ×{c}")]
        stats = by[("ours", f"nf4 stats {n}x{k} ×{c}")]
        assert codes == c * nk // 2
        assert stats == c * (nk // 64 + 4 * math.ceil(nk / 64 / 256) + 4)  # codes, scales, offset
        assert by[("bitsandbytes+peft", f"nf4 codes {n}x{k} ×{c}")] == codes
        assert by[("bitsandbytes+peft", f"nf4 stats {n}x{k} ×{c}")] == stats
    # bitsandbytes copies the NF4 (16 fp32) and dynamic (256 fp32) code books into every weight
    assert by[("bitsandbytes+peft", "code tables")] == n_weights * (16 + 256) * 4 + 256 * 4
    assert by[("ours", "code tables")] == qm.shared_code_tables("ours")
    # adapters: r·(K + N) a weight in bf16; gradients the same; AdamW two moments + a step each
    lora = sum(c * 4 * (n + k) * 2 for (n, k), c in counts.items())
    for side in sides:
        assert by[(side, "lora adapters r=4 (bf16)")] == lora
        assert by[(side, "lora gradients")] == lora
        assert by[(side, "adamw states")] == 2 * lora + 2 * n_weights * 4
        assert by[(side, "embedding, head, norms (bf16)")] == 2 * rest
    for tag in ("checkpointing", "no checkpointing"):
        totals = {s: by[(s, f"total, {tag}")] for s in sides}
        assert all(t > 0 for t in totals.values())
        parts = sum(b for (s, label), b in by.items() if s == "ours" and not label.startswith(("total", "checkp"))
                    and "extra" not in label)
        assert totals["ours"] == parts + by[("ours", f"nf4 matmul extra, {tag}")]
    assert by[("ours", "total, checkpointing")] <= by[("bitsandbytes+peft", "total, checkpointing")]
    for r in rows:
        assert r.mode == "memory" and r.runs == 0 and r.peak_mem_mb == pytest.approx(_extra(r)["bytes"] / 2**20)


def test_qlora_memory_formulas():
    block = [("wq", (4096, 4096)), ("w1", (11008, 4096)), ("w2", (4096, 11008))]
    assert qm.matmul_transient_bytes("bitsandbytes+peft", 11008, 4096) == 11008 * 4096 * (2 + 4 / 64)
    assert qm.matmul_transient_bytes("ours", 11008, 4096) == 11008 * 4096 * 4 // 64
    # ours keeps nothing from forward to backward: the extra is the largest absmax rebuilt
    largest = 11008 * 4096 * 4 // 64
    assert qm.matmul_extra_bytes("ours", block, 32, checkpointing=True) == largest
    assert qm.matmul_extra_bytes("ours", block, 32, checkpointing=False) == largest
    assert qm.matmul_extra_bytes("bitsandbytes+peft", block, 32, True) == 11008 * 4096 * (2 + 4 / 64)
    assert qm.checkpoint_inputs_bytes("ours", 32, 1, 4096, 4096) == 32 * 4096 * 4096 * 2
    assert qm.checkpoint_inputs_bytes("bitsandbytes+peft", 32, 1, 4096, 4096) == 32 * 4096 * 4096 * 2
    with pytest.raises(ValueError, match="adapter_dtype"):
        qm.run(**TINY_LLAMA, adapter_dtype="fp8")
    with pytest.raises(ValueError, match="checkpointing"):
        qm.run(**TINY_LLAMA, checkpointing="maybe")


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves in module(x) that are new: not x, not a parameter
    or buffer of the module (views counted by their storage, each once)."""
    held = {t.untyped_storage().data_ptr() for t in [x, *module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.skipif(not _interpreter(), reason="our Triton path runs on a CPU only under TRITON_INTERPRET=1")
def test_saved_for_backward_formula_is_what_autograd_saves():
    """The matmul extra of the memory table: on the Triton path neither side saves anything
    for the 4-bit matmul beyond what the LoRA branch saves (the (M, r) product, as PEFT): ours
    keeps the stored codes and rebuilds the fp32 absmax in backward; fp16 here (the
    interpreter's bf16 is wrong)."""
    M, N, K, r = 3, 40, 96, 4
    w = 0.02 * torch.randn(N, K, generator=torch.Generator().manual_seed(6))
    x = torch.randn(M, K, dtype=torch.float16, requires_grad=True)
    lora_saved = M * r * 2
    ours = qm.ours_layer(w, r, torch.float16, compute=torch.float16, backend="triton")
    assert _saved_bytes(ours, x) == lora_saved + qm.saved_for_backward_bytes("ours", N, K)
    if _installed("bitsandbytes") and _installed("peft"):
        theirs, _ = qm.bnb_peft_layer(w, r, torch.float16, compute=torch.float16)
        assert _saved_bytes(theirs, x) == lora_saved + qm.saved_for_backward_bytes("bitsandbytes+peft", N, K)


# --- registry -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nf4", "lora", "qlora-memory"])
def test_options_are_the_run_signature(name):
    b = BENCHMARKS[name]
    params = {n: p for n, p in inspect.signature(b.run).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert {o.name for o in b.options} == set(params)
    for o in b.options:
        assert params[o.name].default == o.default, o.name
