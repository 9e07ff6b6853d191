"""The attention lab: its chunked online-softmax attention equals naive attention, its cost
model grows as it should (T² naive, T chunked), its CPU memory probe sees an allocation, and
a tiny quick run writes the report, the results and the plots."""
from __future__ import annotations

import json

import pytest
import torch

from ltk.labs import attention as lab
from ltk.labs.registry import get_lab


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,S", [(1, 1), (29, 29), (16, 61), (40, 40)])
def test_chunked_attention_equals_naive_in_float64(T, S, causal):
    from ltk.kernels.attention import attention_reference

    g = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ref = attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(lab.naive_attention(q, k, v, causal=causal), ref)
    for chunk in (1, 3, 8, 16, S, S + 7):  # divisors of S and not, one block and more
        out = lab.chunked_attention(q, k, v, chunk=chunk, causal=causal)
        assert (out - ref).abs().max().item() < 1e-10, (chunk, causal)


def test_chunked_attention_gives_zero_for_queries_without_keys():
    """Bottom-right causal with T > S: the first T − S queries see no key at all."""
    from ltk.kernels.attention import attention_reference

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    out = lab.chunked_attention(q, k, v, chunk=2, causal=True)
    assert torch.isfinite(out).all() and (out[:, :, :4] == 0).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True))


def test_the_lab_checks_its_chunked_attention():
    assert lab.check_chunked()["max_abs_err_float64"] < 1e-10


def test_cost_model_memory_grows_as_t_squared_naive_and_t_chunked():
    def ratio(method):
        return lab.predicted_bytes(method, 1, 4, 8192, 8192, 64, 128, 4) / \
            lab.predicted_bytes(method, 1, 4, 4096, 4096, 64, 128, 4)

    assert ratio("naive") == pytest.approx(4, rel=0.01)
    assert ratio("chunked") == pytest.approx(2) and ratio("sdpa") == pytest.approx(2)
    # naive: the scores and the probabilities, 2·B·H·T·S·elem, plus the output
    assert lab.predicted_bytes("naive", 2, 3, 5, 7, 4, 16, 2) == 2 * 2 * 3 * 5 * 7 * 2 + 2 * 3 * 5 * 4 * 2


def test_rss_probe_sees_a_64_mib_allocation():
    probe = lab.RssPeak()
    if not probe.available:
        pytest.skip("the peak resident size cannot be reset on this OS")
    mib = probe.measure(lambda: torch.ones(16 * 2**20))  # 64 MiB, every page written
    assert 60 < mib < 80


def _tiny_lab(monkeypatch, seq_lens):
    from ltk.bench.peaks import measure_peaks

    monkeypatch.setattr(lab, "QUICK", lab.Sizes(batch=1, heads=2, head_dim=16, seq_lens=seq_lens, chunk=16,
                                                dtype="fp32", min_time=0.01))
    monkeypatch.setattr(lab, "measure_peaks", lambda device, **kw: measure_peaks(device, copy_mib=4, matmul_n=64,
                                                                                 min_time=0.01))
    monkeypatch.setattr(lab, "resolve_device", lambda device: torch.device("cpu"))


def test_quick_run_writes_report_results_and_plots(tmp_path, monkeypatch):
    _tiny_lab(monkeypatch, (32, 64, 128))
    path = get_lab("attention").run(tmp_path, True)
    md = path.read_text()
    for needle in ("**Question.**", "| T | method |", "naive", "sdpa", "chunked", "ltk lab run attention --quick",
                   "How memory was measured", "memory.png", "time.png"):
        assert needle in md
    for png in ("memory.png", "time.png"):
        assert (tmp_path / png).stat().st_size > 1000
    res = json.loads((tmp_path / "results.json").read_text())
    recs = {(r["T"], r["method"]): r for r in res["records"]}
    assert len(recs) == 9 and res["check"]["max_abs_err_float64"] < 1e-10
    for r in recs.values():
        assert r["median_ms"] > 0 and r["max_abs_diff_vs_naive"] < 1e-5
    for T in (32, 64):  # the cost model beside each point: T² naive, T chunked
        n0, n1 = recs[(T, "naive")]["predicted_mib"], recs[(2 * T, "naive")]["predicted_mib"]
        c0, c1 = recs[(T, "chunked")]["predicted_mib"], recs[(2 * T, "chunked")]["predicted_mib"]
        assert 3.3 < n1 / n0 <= 4 and c1 / c0 == pytest.approx(2)
    assert res["slopes"]["naive"]["predicted_mib"] > 1.6
    assert res["slopes"]["chunked"]["predicted_mib"] == pytest.approx(1.0)
    assert "ours" in res["skipped"]


def test_naive_is_skipped_where_its_scores_would_not_fit(tmp_path, monkeypatch):
    _tiny_lab(monkeypatch, (32, 64))
    monkeypatch.setattr(lab, "available_bytes", lambda device: 40_000)  # T=32 needs 16 kB, T=64 64 kB
    path = lab.run(tmp_path, True)
    recs = {(r["T"], r["method"]): r for r in json.loads((tmp_path / "results.json").read_text())["records"]}
    assert "median_ms" in recs[(32, "naive")] and "T×S scores would need" in recs[(64, "naive")]["skipped"]
    assert recs[(64, "chunked")]["median_ms"] > 0 and recs[(64, "chunked")]["max_abs_diff_vs_naive"] is None
    assert "| 64 | naive | skipped: the T×S scores" in path.read_text()
