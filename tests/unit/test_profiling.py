import json
import time

import pytest
import torch
from torch import nn

from ltk.cli import main
from ltk.training.memory import ActivationPeak, memory_by_category
from ltk.training.nvml import NVMLSampler, NVMLUnavailable
from ltk.training.profiling import StepProfiler, profile_window


class FakeNVML:
    """Two GPUs whose readings are the tick number: device i reads util 10·i + k at tick k,
    memory 1000 + k, power 100 + k W (device 1: not supported), clock 1500 MHz."""

    def __init__(self, fail_after: int | None = None):
        self.reads = {0: 0, 1: 0}
        self.closed = False
        self.fail_after = fail_after

    def open(self, devices):
        return [(0, "fake-a"), (1, "fake-b")]

    def read(self, i):
        k = self.reads[i]
        if self.fail_after is not None and k >= self.fail_after:
            raise OSError("GPU fell off the bus")
        self.reads[i] += 1
        return {"util_pct": 10.0 * i + k, "mem_used_bytes": 1000.0 + k, "power_w": None if i else 100.0 + k,
                "sm_clock_mhz": 1500.0}

    def close(self):
        self.closed = True


def test_sampler_ticks_on_schedule_and_summarises():
    fake = FakeNVML()
    with NVMLSampler(0.02, backend=fake) as s:
        time.sleep(0.25)
    assert s.available and s.reason == "" and fake.closed
    k = s.ticks
    assert k >= 3 and len(s.samples) == 2 * k  # one record per device per tick
    times = sorted({r["t"] for r in s.samples})
    assert len(times) == k
    for j, t in enumerate(times):  # ticks follow t0 + j·interval: never early
        assert t >= j * 0.02 - 1e-3
    summary = s.summary()
    assert summary["sample_count"] == k
    assert summary["achieved_interval_s"] == pytest.approx((times[-1] - times[0]) / (k - 1))
    assert summary["achieved_interval_s"] >= 0.02 - 1e-3
    d0, d1 = summary["devices"]["0"], summary["devices"]["1"]
    assert d0["name"] == "fake-a"
    assert d0["util_pct"] == {"mean": pytest.approx((k - 1) / 2), "max": k - 1}
    assert d1["util_pct"] == {"mean": pytest.approx(10 + (k - 1) / 2), "max": 10 + k - 1}
    assert d0["power_w"]["max"] == 100 + k - 1 and d1["power_w"] is None  # unsupported: no figure, no zero
    assert d0["sm_clock_mhz"] == {"mean": 1500.0, "max": 1500.0}
    n = s.ticks
    time.sleep(0.05)
    assert s.ticks == n  # stopped means stopped


def test_sampler_writes_json(tmp_path):
    with NVMLSampler(0.01, backend=FakeNVML()) as s:
        time.sleep(0.05)
    d = json.loads(s.write(tmp_path / "nvml.json").read_text())
    assert d["available"] and d["sample_count"] >= 1 and len(d["samples"]) == 2 * d["sample_count"]
    assert {"t", "device", "util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz"} <= d["samples"][0].keys()
    assert d["devices"]["1"]["name"] == "fake-b" and d["start_unix"] > 0


def test_sampler_stopped_at_once_summarises_what_it_has():
    s = NVMLSampler(0.5, backend=FakeNVML()).start().stop()
    summary = s.summary()
    assert summary["sample_count"] == s.ticks <= 1 and summary["achieved_interval_s"] is None
    assert s.start_unix is not None


def test_sampler_survives_a_failing_read():
    with NVMLSampler(0.01, backend=FakeNVML(fail_after=2)) as s:
        time.sleep(0.1)
    assert s.ticks == 2 and "OSError" in s.reason and "fell off the bus" in s.reason
    assert s.summary()["sample_count"] == 2


@pytest.mark.parametrize("error, needle", [(NVMLUnavailable("no NVIDIA GPU found"), "no NVIDIA GPU found"),
                                           (OSError("libnvidia-ml.so.1: bad ELF"), "OSError: libnvidia-ml")])
def test_sampler_unavailable_backend_is_reported_not_raised(error, needle):
    class Broken(FakeNVML):
        def open(self, devices):
            raise error

    with NVMLSampler(0.05, backend=Broken()) as s:
        pass
    assert not s.available and s.reason.startswith("NVML unavailable: ") and needle in s.reason
    assert s.samples == [] and s.summary() == {"available": False, "interval_s": 0.05, "reason": s.reason}


def test_real_sampler_never_raises():
    with NVMLSampler(0.01) as s:
        time.sleep(0.05)
    if torch.cuda.is_available():  # a GPU machine: NVML is there too
        assert s.available and s.ticks >= 1, s.reason
    else:
        assert not s.available and s.reason.startswith("NVML unavailable: ")


@pytest.mark.parametrize("kwargs, error", [({"interval_s": 0.001}, ValueError), ({"interval_s": 2.0}, ValueError),
                                           ({"interval_s": "fast"}, TypeError), ({"interval_s": True}, TypeError),
                                           ({"devices": ["0"]}, TypeError)])
def test_sampler_bad_arguments(kwargs, error):
    with pytest.raises(error, match="interval_s|devices"):
        NVMLSampler(**kwargs)


def test_profile_window_shrinks_to_the_steps_left():
    assert profile_window(100, 3) == (1, 1, 3)
    assert profile_window(5, 3) == (1, 1, 3)
    assert profile_window(3, 3) == (1, 1, 1)
    assert profile_window(2, 3) == (0, 1, 1)
    assert profile_window(1, 3) == (0, 0, 1)
    assert profile_window(0, 3) == (0, 0, 0)
    with pytest.raises(ValueError, match="profile_steps"):
        profile_window(10, 0)


def test_step_profiler_records_the_window(tmp_path):
    lin = nn.Linear(8, 8)
    prof = StepProfiler(tmp_path, torch.device("cpu"), active=2, steps_left=10, first_step=4)
    prof.start()
    for _ in range(6):
        lin(torch.randn(4, 8)).sum().backward()
        prof.step()
    info = prof.stop()
    assert info["steps"] == [7, 8] and info["schedule"] == {"wait": 1, "warmup": 1, "active": 2}
    assert "traceEvents" in json.loads((tmp_path / "trace.json").read_text())
    assert "aten::addmm" in (tmp_path / "top_ops.txt").read_text()
    assert "CUDA-only" in info["memory_snapshot"]


def test_memory_by_category_counts_bytes_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))  # 15 + 3 + 6 + 2 = 26 parameters
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    before = memory_by_category(model, opt, 0)
    assert before == {"parameters": 104, "gradients": 0, "optimizer_states": 0, "activations": 0, "total": 104}
    model(torch.randn(7, 5)).sum().backward()
    opt.step()
    m = memory_by_category(model, opt, 40)
    # fp32: 26·4 bytes of weights, as many of gradients, Adam's m and v (2·104) + a 0-d fp32 step per tensor (4·4)
    assert m == {"parameters": 104, "gradients": 104, "optimizer_states": 224, "activations": 40, "total": 472}
    opt.zero_grad(set_to_none=True)
    assert memory_by_category(model, opt, 0)["gradients"] == 0
    with pytest.raises(ValueError, match="activations_bytes"):
        memory_by_category(model, opt, -1)


def test_mixed_precision_counts_the_fp32_masters_as_optimizer_state():
    """bf16 weights and gradients (2 bytes each), the fp32 master in the optimizer: ZeRO's K = 12
    (4 master + 8 moments) plus the step counters; the fp32 gradient copy is gone after the step."""
    from ltk.parallel.mixed import MasterOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))  # 26 parameters, 4 tensors
    opt = MasterOptimizer(model.parameters(), lambda g: torch.optim.AdamW(g, foreach=False))
    model(torch.randn(7, 5, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    m = memory_by_category(model, opt, 0)
    assert m["parameters"] == m["gradients"] == 2 * 26
    assert m["optimizer_states"] == 12 * 26 + 4 * 4
    assert all(master.grad is None for master in opt.masters())


def test_tied_and_view_storages_count_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # weight tying: one storage under two names
    model = nn.ModuleList([emb, head])
    assert memory_by_category(model, None, 0)["parameters"] == 10 * 4 * 4
    assert memory_by_category([emb, head], None, 0)["parameters"] == 10 * 4 * 4  # a list of modules too


def test_activation_peak_is_the_live_peak():
    x = torch.randn(1000, requires_grad=True)
    with ActivationPeak(nn.Linear(1, 1)) as acts:
        loss = x.exp().exp().sum()  # each exp saves its output: 2 · 1000 · 4 bytes
        assert acts.live == 8000
        loss.backward()
        assert acts.live == 0  # released after backward
        loss = x.exp().exp().sum()  # a second micro-batch after the first was freed: same peak
        loss.backward()
        assert acts.peak == 8000
        a, b = x.exp().exp().sum(), x.exp().exp().sum()  # two graphs alive at once (a pipeline's in flight)
        assert acts.peak == 16000
        a.backward()
        b.backward()
    assert acts.live == 0


def test_activation_peak_excludes_weights_matches_saved_activations_and_keeps_numerics():
    from ltk.models.gpt import GPT, GPTConfig
    from ltk.training.memory import saved_activations

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    x = torch.randint(0, 64, (3, 16))

    def grads(ctx):
        model.zero_grad(set_to_none=True)
        with ctx:
            model(x).float().logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    acts = ActivationPeak(model)
    hooked = grads(acts)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))  # bit for bit
    with saved_activations(model) as ref:  # bytes saved over one forward
        model(x).float().logsumexp(-1).mean()
    assert acts.peak == ref.bytes > 0
    weights = sum(p.numel() * 4 for p in model.parameters())
    with ActivationPeak(model) as few:  # a batch of one token: activations far below the weights
        model(x[:1, :1]).float().sum()
    assert 0 < few.peak < weights / 10


def test_ltk_train_profile_writes_trace_memory_and_nvml(tiny_config, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    run = tmp_path / "run"
    assert main(["train", "--preset", "gpt-debug", "--max-steps", "3", "--profile", "--data", cfg.data.source,
                 "--out", str(run), "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2",
                 "--model.block_size", "32", "--data.vocab_size", "300", "--data.min_chars", "16",
                 "--trainer.batch_size", "4", "--trainer.eval_batches", "1", "--trainer.progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "profile/trace.json" in out and "ui.perfetto.dev" in out
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert "aten::" in (run / "profile" / "top_ops.txt").read_text()
    s = json.loads((run / "summary.json").read_text())
    mem = s["memory"]
    cats = ("parameters", "gradients", "optimizer_states", "activations")
    assert all(mem[c] > 0 for c in cats) and sum(mem[c] for c in cats) == mem["total"]
    # fp32 AdamW: weights = gradients = 4 bytes a parameter; m and v twice that, + 4 bytes per tensor for the steps
    assert mem["parameters"] == mem["gradients"] == 4 * s["params"]
    assert 2 * mem["parameters"] < mem["optimizer_states"] < 2 * mem["parameters"] + 4 * 100
    assert s["profile"]["trace"].endswith("trace.json") and s["profile"]["steps"] == [3, 3]
    nvml = json.loads((run / "profile" / "nvml.json").read_text())
    if torch.cuda.is_available():
        assert s["nvml"]["available"]
    else:
        assert s["nvml"]["reason"].startswith("NVML unavailable: ") and nvml["reason"] == s["nvml"]["reason"]


def test_a_run_without_profile_still_reports_memory(tiny_config, tmp_path):
    from ltk.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "plain", max_steps=2, grad_accum=2)
    Trainer(cfg).fit()
    s = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert s["memory"]["activations"] > 0 and "profile" not in s and "nvml" not in s
    assert not (tmp_path / "plain" / "profile").exists()
    # every rank's peak per phase beside the plan (one rank here); no trace unless asked for
    per_rank = s["memory_per_rank"]
    assert [r["rank"] for r in per_rank["ranks"]] == [0] and per_rank["plan"]["strategy"] == "none"
    r = per_rank["ranks"][0]
    assert list(r["phases"]) == ["init", "train", "eval", "save"]
    assert r["peak"] == max(p["peak"] for p in r["phases"].values()) > r["baseline"] > 0
    assert per_rank["full_copy"] == 16 * s["params"] and not (tmp_path / "plain" / "memory").exists()
