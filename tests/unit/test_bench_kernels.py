"""The kernel benchmarks (attention, layernorm, rmsnorm, swiglu, rope) on a CPU at tiny sizes: every row
has positive figures computed from the kernels' cost models, skipped providers are named
with their reason, one provider's failure does not end the sweep, and the timed regions
compute what they say."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ltk.bench.attention as bench_attention
import ltk.bench.norms as bench_norms
import ltk.bench.rope as bench_rope
import ltk.bench.swiglu as bench_swiglu
from ltk.bench import BENCHMARKS, run_benchmark
from ltk.bench.sweep import parse_choices, parse_sizes, timed_call

TINY_ATTN = dict(seq_lens="16,32", heads=2, head_dim=8, tokens=64, min_time=0.01, device="cpu")
TINY_NORM = dict(hidden_sizes="32,96", rows=8, min_time=0.01, copy_mib=4, device="cpu")


def _extra(row) -> dict:
    return json.loads(row.extra)


def _check_timing(row) -> None:
    assert 0 < row.p20_ms <= row.median_ms <= row.p80_ms and row.runs >= 1
    assert row.peak_mem_mb is None and row.pct_of_peak is None  # a CPU: no allocator stats, no datasheet


# --- attention ------------------------------------------------------------------------------

def test_attention_rows_use_the_kernel_cost_model_and_name_skipped_providers():
    from ltk.kernels.attention import flops

    rows = run_benchmark("attention", **TINY_ATTN, causal="both", modes="fwd,bwd,fwd+bwd",
                         providers="ours,torch,sdpa,flash-attn")
    got = {(r.provider, r.shape, r.mode) for r in rows}
    assert {p for p, _, _ in got} >= {"torch", "sdpa"}
    assert len({(s, m) for _, s, m in got}) == 2 * 2 * 3  # T × causal × mode
    for r in rows:
        _check_timing(r)
        e = _extra(r)
        assert e["B"] * e["T"] == 64 and e["H"] == 2 and e["D"] == 8
        assert e["flops"] == flops(e["B"], e["H"], e["T"], e["S"], e["D"], causal=e["causal"], mode=r.mode)
        assert r.tflops == pytest.approx(e["flops"] / (r.median_ms * 1e-3) / 1e12)
        assert r.tflops > 0 and ("causal" in r.shape) == e["causal"]
    for r in rows:
        if r.provider == "torch":
            assert r.speedup == 1.0
    skipped = rows.skipped_summary()
    assert "CUDA" in skipped["ours"] and "interpreter" in skipped["ours"]
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert skipped["flash-attn"] == "flash-attn not installed"
    assert _extra(rows[0])["skipped"] == skipped  # the CSV keeps what did not run


def _each_point_ran_or_was_skipped(rows, modes):
    """Every mode has exactly one row or one skip (with the error that stopped it)."""
    for mode in modes:
        ran = [r for r in rows if r.mode == mode]
        skipped = [s for s in rows.skipped if s.point.endswith(" " + mode)]
        assert len(ran) + len(skipped) == 1, (mode, ran, skipped)
        assert all(s.reason.startswith("failed: ") for s in skipped)
    for r in rows:
        _check_timing(r)


def test_attention_torch_compile_runs_every_mode_or_says_why():
    rows = run_benchmark("attention", **{**TINY_ATTN, "seq_lens": "16"}, causal="yes", modes="fwd,bwd",
                         providers="torch.compile")
    _each_point_ran_or_was_skipped(rows, ["fwd", "bwd"])


def test_eager_attention_equals_the_kernels_reference():
    from ltk.kernels.attention import attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64) for _ in range(2))  # GQA: H_kv = 2
    for causal in (False, True):
        torch.testing.assert_close(bench_attention.eager_attention(q, k, v, causal),
                                   attention_reference(q, k, v, causal=causal))


def test_eager_is_skipped_when_its_scores_do_not_fit(monkeypatch):
    monkeypatch.setattr(bench_attention, "available_bytes", lambda device: 1000)
    rows = run_benchmark("attention", **TINY_ATTN, causal="no", modes="fwd", providers="torch,torch.compile,sdpa")
    assert {r.provider for r in rows} == {"sdpa"}
    reasons = {s.provider: s.reason for s in rows.skipped}
    assert "torch eager would need" in reasons["torch"] and "T×S scores" in reasons["torch.compile"]


def test_out_of_memory_in_one_provider_does_not_end_the_sweep(monkeypatch):
    real = bench_attention.build

    def build(provider, *args):
        if provider == "sdpa":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(provider, *args)

    monkeypatch.setattr(bench_attention, "build", build)
    rows = run_benchmark("attention", **TINY_ATTN, causal="no", modes="fwd", providers="torch,sdpa")
    assert {r.provider for r in rows} == {"torch"} and len(rows) == 2
    assert [s.reason for s in rows.skipped if s.provider == "sdpa"] == ["out of memory"] * 2


def test_attention_plot_is_written(tmp_path):
    path = tmp_path / "attn.png"
    run_benchmark("attention", **{**TINY_ATTN, "seq_lens": "16,32"}, causal="no", modes="fwd,fwd+bwd",
                  providers="torch,sdpa", plot=str(path))
    assert path.stat().st_size > 1000


def test_cli_prints_rows_and_the_skipped_providers(capsys):
    from ltk.cli import main

    assert main(["bench", "attention", "--seq-lens", "16", "--heads", "2", "--head-dim", "8", "--tokens", "32",
                 "--min-time", "0.01", "--device", "cpu", "--modes", "fwd", "--causal", "no",
                 "--providers", "ours,torch,flash-attn"]) == 0
    out, err = capsys.readouterr()
    assert "| torch |" in out
    assert "ours" in err and "needs CUDA" in err and "flash-attn" in err


# --- the timed regions ----------------------------------------------------------------------

def test_timed_modes_compute_the_same_gradients_without_accumulating():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g, requires_grad=True)
    w = torch.randn(7, generator=g, requires_grad=True)

    def forward():
        return (x * w).tanh()

    with torch.no_grad():
        assert not timed_call(forward, [x, w], "fwd")().requires_grad
    bwd, both = timed_call(forward, [x, w], "bwd"), timed_call(forward, [x, w], "fwd+bwd")
    first, second, third = bwd(), bwd(), both()  # bwd re-walks one retained graph
    for a, b, c in zip(first, second, third):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    assert x.grad is None and w.grad is None  # autograd.grad returns, never accumulates


def test_option_parsing():
    assert parse_sizes("512,1k, 2K") == [512, 1024, 2048] and parse_sizes(64) == [64]
    for bad in ("0", "12x", ""):
        with pytest.raises(ValueError, match="positive sizes"):
            parse_sizes(bad)
    with pytest.raises(ValueError, match="provider"):
        parse_choices("torch,sdap", bench_attention.PROVIDERS, "provider")
    assert BENCHMARKS["rmsnorm"].parse_args(["--residual", "--hidden-sizes", "1k"]) == \
        {"residual": True, "hidden_sizes": "1k"}
    assert BENCHMARKS["attention"].parse_args(["--causal", "yes"]) == {"causal": "yes"}


# --- layernorm / rmsnorm ---------------------------------------------------------------------

@pytest.mark.parametrize("op,residual", [("layernorm", False), ("rmsnorm", True)])
def test_norm_rows_use_the_kernel_cost_model(op, residual):
    import ltk.kernels.layernorm as kernel_layernorm
    import ltk.kernels.rmsnorm as kernel_rmsnorm

    cost = kernel_layernorm if op == "layernorm" else kernel_rmsnorm
    rows = run_benchmark(op, **TINY_NORM, residual=residual, providers="ours,torch,unfused,liger")
    assert {r.provider for r in rows} == {"torch", "unfused"}
    assert len(rows) == 2 * 2 * 3  # sizes × providers × modes
    for r in rows:
        _check_timing(r)
        e = _extra(r)
        assert r.op == op + ("+residual" if residual else "") and e["residual"] == residual
        nbytes = cost.bytes_moved(8, e["cols"], dtype_bytes=4, mode=r.mode, residual=residual)
        assert e["bytes"] == nbytes and e["flops"] == cost.flops(8, e["cols"], mode=r.mode, residual=residual)
        assert r.gbps == pytest.approx(nbytes / (r.median_ms * 1e-3) / 1e9) and r.gbps > 0
        assert e["copy_gbps"] > 0 and e["pct_of_copy"] == pytest.approx(100 * r.gbps / e["copy_gbps"])
    skipped = rows.skipped_summary()
    assert "CUDA" in skipped["ours"] and "liger" in skipped


def test_norm_torch_compile_runs_or_says_why():
    rows = run_benchmark("layernorm", **{**TINY_NORM, "hidden_sizes": "32"}, modes="fwd,bwd",
                         providers="torch.compile")
    _each_point_ran_or_was_skipped(rows, ["fwd", "bwd"])


def test_unfused_norms_equal_pytorch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 33, generator=g, dtype=torch.float64)
    w, b = torch.randn(33, generator=g, dtype=torch.float64), torch.randn(33, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bench_norms.unfused_layer_norm(x, w, b, 1e-5).double(),
                               F.layer_norm(x, (33,), w, b, 1e-5))
    torch.testing.assert_close(bench_norms.unfused_rms_norm(x, w, 1e-6).double(), F.rms_norm(x, (33,), w, 1e-6))


@pytest.mark.parametrize("name", ["attention", "layernorm", "rmsnorm", "swiglu", "rope"])
def test_help_lists_every_option(name, capsys):
    from ltk.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(o.flag in out for o in BENCHMARKS[name].options)


# --- every provider's closure computes the same function ------------------------------------
# (ours runs here under the Triton interpreter, which the benchmarks never time)

def _providers_to_compare(all_providers, cuda_only):
    from ltk.kernels.backend import HAS_TRITON, interpreter_on

    if not (HAS_TRITON and interpreter_on()):
        pytest.skip("our kernels run on a CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    return [p for p in all_providers if p not in cuda_only or p == "ours"]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_providers_agree(causal):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=g) for _ in range(3))
    results = {}
    for p in _providers_to_compare(bench_attention.PROVIDERS, ("ours", "torch.compile", "flash-attn")):
        forward, inputs = bench_attention.build(p, q, k, v, causal, 0.25)
        out = forward()
        results[p] = (out, timed_call(forward, inputs, "bwd")())
    ref_out, ref_grads = results.pop("torch")
    assert set(results) == {"ours", "sdpa"}
    for p, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4, msg=p)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=p)


@pytest.mark.parametrize("op,residual", [("layernorm", False), ("layernorm", True), ("rmsnorm", False),
                                         ("rmsnorm", True)])
def test_norm_providers_agree(op, residual):
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(7, 40, generator=g), torch.randn(7, 40, generator=g)
    w, b = 1 + 0.1 * torch.randn(40, generator=g), (0.1 * torch.randn(40, generator=g) if op == "layernorm" else None)
    eps = bench_norms.EPS[op]
    results = {}
    for p in _providers_to_compare(bench_norms.PROVIDERS, ("ours", "torch.compile", "liger")):
        forward, inputs = bench_norms.build(p, op, x, r, w, b, eps, residual)
        results[p] = (forward(), timed_call(forward, inputs, "bwd")())
    ref_out, ref_grads = results.pop("torch")
    assert set(results) == {"ours", "unfused"}
    for p, (out, grads) in results.items():
        for a, b_ in zip(out if residual else [out], ref_out if residual else [ref_out]):
            torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4, msg=p)
        for a, b_ in zip(grads, ref_grads):
            torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4, msg=p)


def test_a_failed_compile_is_reported_and_the_sweep_goes_on(monkeypatch):
    def broken_compile(fn, **kw):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = run_benchmark("attention", **{**TINY_ATTN, "seq_lens": "16"}, causal="no", modes="fwd",
                         providers="torch,torch.compile")
    assert [r.provider for r in rows] == ["torch"]
    reason = rows.skipped_summary()["torch.compile"]
    assert reason == "failed: RuntimeError: InvalidCxxCompiler: no working C++ compiler found"


# --- cross-entropy ----------------------------------------------------------------------------

def test_cross_entropy_rows_measure_peaks_in_fresh_processes_and_compare_them():
    from ltk.bench.cross_entropy import memory_section
    from ltk.kernels.fused_linear_ce import flops

    rows = run_benchmark("cross-entropy", tokens="24", vocab_sizes="50", hidden=8, min_time=0.01, device="cpu")
    assert {r.provider for r in rows} == {"fused", "torch"}
    for r in rows:
        e = _extra(r)
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms and r.peak_mem_mb > 0 and e["peak_source"].startswith("VmHWM")
        assert e["flops"] == flops(24, 8, 50) and r.tflops == pytest.approx(e["flops"] / (r.median_ms * 1e-3) / 1e12)
    skipped = rows.skipped_summary()
    # Liger: not installed (CI) or, installed, its kernels need CUDA
    assert ("CUDA" in skipped["liger"] or "not installed" in skipped["liger"]) and "CUDA" in skipped["torch.compile"]
    assert "| N=24,d=8,V=50 |" in rows.sections["Memory"]
    for r in rows:  # the verdict of the point, from rows relabelled to it
        r.shape = "N=8192,d=2048,V=128256"
        r.peak_mem_mb = 100.0 if r.provider == "torch" else 20.0
    assert "0.200, met" in memory_section(rows)
# --- swiglu / rope ----------------------------------------------------------------------------

def test_swiglu_and_rope_rows_use_the_kernel_cost_models():
    import ltk.kernels.rope as kernel_rope
    import ltk.kernels.swiglu as kernel_swiglu

    rows = run_benchmark("swiglu", activation="gelu_tanh", ffn_sizes="33", rows=4, min_time=0.01, copy_mib=4,
                         device="cpu")
    rows += run_benchmark("rope", seq_lens="5", batch=2, heads=4, kv_heads=2, head_dim=8, modes="fwd,bwd",
                          min_time=0.01, copy_mib=4, device="cpu")
    assert [(r.op, r.provider, r.mode) for r in rows] == \
        [("geglu-tanh", "torch", m) for m in ("fwd", "bwd", "fwd+bwd")] + [("rope", "torch", m) for m in ("fwd", "bwd")]
    for r in rows:
        _check_timing(r)
        e = _extra(r)
        nbytes = kernel_swiglu.bytes_moved(4 * 33, dtype_bytes=4, mode=r.mode) if r.op != "rope" else \
            kernel_rope.bytes_moved(2, 4, 2, 5, 8, dtype_bytes=4, mode=r.mode)
        assert e["bytes"] == nbytes and r.gbps == pytest.approx(nbytes / (r.median_ms * 1e-3) / 1e9)
        assert e["pct_of_copy"] == pytest.approx(100 * r.gbps / e["copy_gbps"]) and r.speedup == 1.0
        skipped = e["skipped"]
        assert "CUDA" in skipped["ours"] and "CUDA" in skipped["torch.compile"] and "liger" in skipped
    assert "CUDA" in skipped["ours-inplace"]
    with pytest.raises(ValueError, match="activation"):
        run_benchmark("swiglu", activation="relu", device="cpu")
    assert "erf GELU" in bench_swiglu.unavailable("liger", "gelu", torch.device("cuda"))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_swiglu_providers_agree(activation):
    g = torch.Generator().manual_seed(6)
    a, u = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g)
    results = {}
    for p in _providers_to_compare(bench_swiglu.PROVIDERS, ("ours", "ours-saved", "torch.compile", "liger")):
        forward, inputs = bench_swiglu.build(p, activation, a, u)
        results[p] = (forward(), timed_call(forward, inputs, "bwd")())
    ref_out, ref_grads = results.pop("torch")
    assert set(results) == {"ours"}
    forward, inputs = bench_swiglu.build("ours-saved", activation, a, u)
    results["ours-saved"] = (forward(), timed_call(forward, inputs, "bwd")())
    for p, (out, grads) in results.items():
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4, msg=p)
        for x, y in zip(grads, ref_grads):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=p)


def test_rope_providers_agree():
    from ltk.models.llama import rope_cos_sin

    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 6, 4, 16, generator=g), torch.randn(2, 6, 2, 16, generator=g)   # (B, T, H, D)
    cos, sin = rope_cos_sin(torch.arange(6), 16, 10000.0)
    results = {}
    for p in _providers_to_compare(bench_rope.PROVIDERS, ("ours", "ours-inplace", "torch.compile", "liger")):
        forward, inputs = bench_rope.build(p, q, k, cos, sin)
        results[p] = (forward(), timed_call(forward, inputs, "bwd")())
    ref_out, ref_grads = results.pop("torch")
    assert set(results) == {"ours"}
    for x, y in zip(results["ours"][0] + results["ours"][1], ref_out + ref_grads):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    forward, _ = bench_rope.build("ours-inplace", q, k, cos, sin)
    with torch.no_grad():  # the timed forward mode: in place on the leaves' memory
        out = forward()
    for x, y in zip(out, ref_out):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert "forward only" in bench_rope.skip_mode("ours-inplace", "bwd") and bench_rope.skip_mode("ours", "bwd") is None
