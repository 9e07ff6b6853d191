"""The GPU check script's own logic, exercised on a CPU through the Triton interpreter
(the real run needs CUDA and happens on a GPU machine)."""
import pytest
import torch

from ltk.bench import gpu_check
from ltk.kernels.attention import attention
from ltk.kernels.layernorm import layer_norm


def test_compare_passes_a_correct_kernel_and_fails_a_wrong_one(monkeypatch):
    x, w, b = torch.randn(5, 33), torch.randn(33), torch.randn(33)
    for t in (x, w, b):
        t.requires_grad_(True)
    ok = gpu_check._compare("layernorm", "5x33", "fp16",
                            lambda t, be: layer_norm(t[0], t[1], t[2], backend=be), [x, w, b])
    assert ok.passed and set(ok.errors) == {"out0", "grad0", "grad1", "grad2"}

    def broken(t, be):  # the "triton" side drops the bias: must fail
        return layer_norm(t[0], t[1], t[2] * (0 if be == "triton" else 1), backend=be)

    bad = gpu_check._compare("layernorm", "5x33", "fp16", broken, [x, w, b])
    assert not bad.passed


def test_compare_on_attention_with_gqa():
    q, k, v = (torch.randn(1, 4, 9, 32, requires_grad=True), torch.randn(1, 2, 11, 32, requires_grad=True),
               torch.randn(1, 2, 11, 32, requires_grad=True))
    chk = gpu_check._compare("attention", "gqa", "fp16",
                             lambda t, be: attention(t[0], t[1], t[2], causal=True, backend=be), [q, k, v])
    assert chk.passed, (chk.errors, chk.torch_errors)
    text = gpu_check.report({"device": "cpu", "date": "2026-01-01"}, [chk], [], ["flash-attn: not installed"])
    assert "1/1 pass" in text and "flash-attn: not installed" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_main_says_clearly_that_it_needs_cuda(capsys):
    assert gpu_check.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


def test_nf4_and_lora_cases_pass_and_a_wrong_kernel_fails():
    """The NF4 and LoRA cases of the GPU check, at tiny odd shapes through the interpreter
    (fp16: its bf16 is wrong): ours passes against the float64 reference; a kernel whose
    output is off by a little fails."""
    from ltk.kernels.backend import HAS_TRITON, interpreter_on

    if not (HAS_TRITON and interpreter_on()):
        pytest.skip("our kernels run on a CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    for kernel, case, run, inputs in (gpu_check.nf4_case(7, 40, 70, "cpu"),
                                      gpu_check.lora_case(5, 33, 40, 3, True, "cpu")):
        chk = gpu_check._compare(kernel, case, "fp16", run, inputs)
        n_grads = sum(t.requires_grad for t in inputs)
        assert chk.passed and len(chk.errors) == 1 + n_grads, (kernel, chk.errors, chk.torch_errors)

        def off(t, be, run=run):  # the "triton" side scaled by 1.01: must fail
            return run(t, be) * (1.01 if be == "triton" else 1.0)

        assert not gpu_check._compare(kernel, case, "fp16", off, inputs).passed, kernel
    assert [t.requires_grad for t in gpu_check.lora_case(5, 33, 40, 3, True, "cpu")[3]] == \
        [True, False, True, True, False]  # x, W, A, B, b: W and b frozen


def test_glu_and_rope_cases_pass_and_a_wrong_kernel_fails():
    """The SwiGLU/GeGLU and RoPE cases (strided q, k; per-sequence cos/sin; in place) at tiny odd
    shapes through the interpreter: ours passes; an output off by 1% fails."""
    from ltk.kernels.backend import HAS_TRITON, interpreter_on

    if not (HAS_TRITON and interpreter_on()):
        pytest.skip("our kernels run on a CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    for (kernel, case, run, inputs), n in ((gpu_check.glu_case(5, 37, "gelu_tanh", "cpu"), 3),  # y, dg, du
                                           (gpu_check.rope_case(2, 4, 2, 9, 16, True, True, "cpu"), 4)):
        chk = gpu_check._compare(kernel, case, "fp16", run, inputs)
        assert chk.passed and len(chk.errors) == n, (kernel, chk.errors, chk.torch_errors)

        def off(t, be, run=run):
            out = run(t, be)
            scale = 1.01 if be == "triton" else 1.0
            return tuple(o * scale for o in out) if isinstance(out, tuple) else out * scale

        assert not gpu_check._compare(kernel, case, "fp16", off, inputs).passed, kernel


# --- the plan, the train step, the scaling lab, the report ------------------------------------

def test_plan_trains_gpt2_eager_compiled_and_transformers_within_the_budget():
    import inspect

    from ltk.bench import get_benchmark
    from ltk.bench.train_step import parse_providers

    for quick in (False, True):
        plan = gpu_check.benchmark_plan(quick)
        step = [e for e in plan if e.bench == "train-step" and e.kwargs.get("model", "gpt") == "gpt"]
        assert len(step) == 1 and step[0].kwargs["preset"] == "gpt2-124m"
        assert parse_providers(step[0].kwargs["providers"]) == ("ours", "ours-compile", "transformers")
        hf = [e for e in plan if e.kwargs.get("model") == "llama"]  # patched with ours vs with Liger, tokens/s
        assert len(hf) == 1 and "transformers+liger" in hf[0].kwargs["providers"]
        ce = [e for e in plan if e.bench == "cross-entropy"]  # fused vs Liger's fused, at Llama 3's vocabulary
        assert len(ce) == 1 and "liger" in ce[0].kwargs["providers"] and ce[0].kwargs["vocab_sizes"] == "128256"
        for e in plan:  # every option the plan passes exists (a typo would only fail on the GPU)
            inspect.signature(get_benchmark(e.bench).run).bind(device="cuda", **e.kwargs)
        assert len({e.label for e in plan}) == len(plan)  # one Time row each
        assert gpu_check.CORRECTNESS_BUDGET_S + sum(e.budget_s for e in plan) <= gpu_check.BUDGET_S == 480


def test_scaling_lab_needs_two_gpus(monkeypatch, tmp_path):
    for n in (0, 1):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=n: n)
        result, skipped = gpu_check.scaling_part(tmp_path, quick=True)
        assert result is None and skipped == [f"scaling lab: needs at least 2 GPUs, found {n}"]


def test_scaling_lab_missing_or_failing_is_listed_and_its_table_is_kept(monkeypatch, tmp_path):
    import sys
    import types

    from ltk import labs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delattr(labs, "scaling", raising=False)
    monkeypatch.setitem(sys.modules, "ltk.labs.scaling", None)  # import fails
    result, skipped = gpu_check.scaling_part(tmp_path, quick=True)
    assert result is None and len(skipped) == 1 and "ltk.labs.scaling could not be imported: " in skipped[0]

    def use(run):
        fake = types.ModuleType("ltk.labs.scaling")
        fake.run = run
        monkeypatch.setitem(sys.modules, "ltk.labs.scaling", fake)
        monkeypatch.setattr(labs, "scaling", fake, raising=False)
        return gpu_check.scaling_part(tmp_path / "lab", quick=True)

    def boom(out_dir, quick):
        raise RuntimeError("nccl timeout")

    result, skipped = use(boom)
    assert result is None and skipped == ["scaling lab: failed: RuntimeError: nccl timeout"]

    def ok(out_dir, quick):
        path = out_dir / "report.md"
        path.write_text("# Scaling\n\ntext\n\n| GPUs | tokens/s |\n|---|---|\n| 1 | 10 |\n| 2 | 19 |\n\n"
                        "| second | table |\n|---|---|\n")
        return path

    result, skipped = use(ok)
    assert skipped == [] and result["gpus"] == 2 and result["report"] == str(tmp_path / "lab" / "report.md")
    assert result["table"] == "| GPUs | tokens/s |\n|---|---|\n| 1 | 10 |\n| 2 | 19 |"
    text = gpu_check.report({"device": "cpu", "date": "2026-01-01"}, [], [], skipped, scaling=result)
    assert "## Scaling lab (2 GPUs, quick preset)" in text and "| 2 | 19 |" in text and "second" not in text


def test_report_lists_every_skipped_part_and_the_time_against_the_budget():
    skipped = ["scaling lab: needs at least 2 GPUs, found 1", "attention causal: flash-attn: not installed",
               "train-step MFU of ours: no datasheet bf16 peak for X in ltk/bench/peaks.py"]
    times = {"correctness": 50.0, "train-step": 140.0, "scaling lab": 300.0}
    budgets = {"correctness": 60.0, "train-step": 150.0, "scaling lab": None}
    text = gpu_check.report({"device": "cpu", "date": "2026-01-01"}, [], [], skipped, times=times,
                            budgets=budgets, total_s=495.0)
    section = text[text.index("## Skipped"):]
    assert all(f"- {s}" in section for s in skipped)
    time_section = text[text.index("## Time"):text.index("## Skipped")]
    assert "| correctness | 50 | 60 |" in time_section and "| train-step | 140 | 150 |" in time_section
    assert "| scaling lab | 300 | outside the one-GPU budget |" in time_section
    assert "**495**" in time_section and "190 s of the 480 s" in time_section and "within" in time_section
    over = gpu_check.report({"device": "cpu", "date": "2026-01-01"}, [], [], [],
                            times={"train-step": 500.0}, budgets={"train-step": 150.0})
    assert "OVER by 20 s" in over and "- nothing" in over


def test_benchmarks_run_the_train_step_part_and_list_what_did_not_run(monkeypatch):
    """The train-step part of the plan on a CPU, tiny: eager and compiled rows (aot_eager:
    inductor's C++ compile takes minutes on a small CPU), each part's seconds, the missing MFU
    and a failing part listed as skipped."""
    entry = gpu_check.PlanEntry("train-step", "train-step", dict(
        vocab_size=256, batch_size=2, seq_len=16, min_time=0.05, rounds=1, providers="ours,ours-compile",
        compile_backend="aot_eager"), 1.0)
    broken = gpu_check.PlanEntry("layernorm", "layernorm", dict(no_such_option=1), 1.0)
    monkeypatch.setattr(gpu_check, "benchmark_plan", lambda quick: [entry, broken])
    times: dict = {}
    rows, skipped = gpu_check.benchmarks(torch.device("cpu"), True, times)
    assert [r.provider for r in rows] == ["ours", "ours-compile"] and set(times) == {"train-step", "layernorm"}
    assert any(s.startswith("train-step MFU of ours-compile: no datasheet fp32 peak") for s in skipped)
    assert any(s.startswith("layernorm {'no_such_option': 1}: TypeError") for s in skipped)
    text = gpu_check.report({"device": "cpu", "date": "2026-01-01"}, [], rows, skipped, times=times,
                            budgets={"train-step": 1.0, "layernorm": 1.0})
    assert "## Train step" in text and "| ours-compile (aot_eager) |" in text and "## Time" in text
    only, _ = gpu_check.benchmarks(torch.device("cpu"), True, {}, only="layernorm")
    assert only == []  # only the named benchmark ran (and failed, listed)


# --- ltk/bench/train_step.py's ours-compile provider ------------------------------------------------

def test_train_step_providers_default_all_and_typos():
    from ltk.bench.train_step import parse_providers

    assert parse_providers(None) == ("ours", "transformers")  # the compile stays out of the default
    assert parse_providers("all") == ("ours", "ours-compile", "transformers")
    assert parse_providers("transformers, ours-compile") == ("ours-compile", "transformers")
    with pytest.raises(ValueError, match="ours-compiled"):
        parse_providers("ours,ours-compiled")
    with pytest.raises(TypeError, match="providers"):
        parse_providers(["ours"])


def test_ours_compile_gives_the_same_first_step_loss_as_ours():
    """Our GPT wrapped in torch.compile, on a tiny config on a CPU: the first training step
    (same weights, same batch) gives ours' loss within 1e-4, and the following steps too (same
    AdamW). The backend is aot_eager (Dynamo's capture and AOTAutograd's backward graph, no
    code generation): inductor's C++ compile takes minutes on a small CPU; the GPU check
    compiles with inductor."""
    from ltk.bench.train_step import build, make_batches, make_optimizer, make_step, warm_up
    from ltk.models.gpt import GPTConfig

    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cpu = torch.device("cpu")
    models = build(cfg, cpu, with_baseline=False, compile_backend="aot_eager")
    assert set(models) == {"ours", "ours-compile"}
    assert models["ours-compile"]._orig_mod is not models["ours"]  # its own parameters and AdamW
    batches = make_batches(cfg.vocab_size, 2, cfg.block_size)
    steps = {p: make_step(m, make_optimizer(m, cpu), batches) for p, m in models.items()}
    losses, seconds, skipped = warm_up(steps, {"ours": 2, "ours-compile": 2})
    assert skipped == [] and set(seconds) == {"ours", "ours-compile"}
    assert abs(losses["ours-compile"] - losses["ours"]) < 1e-4
    assert steps["ours-compile"]().item() == pytest.approx(steps["ours"]().item(), abs=1e-4)  # step 3


def test_train_step_run_reports_the_compiled_row_and_refuses_a_different_model(monkeypatch):
    import json

    import ltk.bench.train_step as ts

    tiny = dict(vocab_size=256, batch_size=2, seq_len=16, min_time=0.05, rounds=2, device="cpu",
                providers="ours,ours-compile", compile_backend="aot_eager")
    rows = ts.run(**tiny)
    assert [r.provider for r in rows] == ["ours", "ours-compile"] and rows.skipped == []
    extra = json.loads(rows[1].extra)
    assert extra["compile_backend"] == "aot_eager" and extra["first_step_loss_diff_vs_ours"] < 1e-4
    assert extra["warmup_steps"] == 3 and extra["warmup_s"] > 0
    assert all(r.throughput > 0 and r.tflops > 0 and r.pct_of_peak is None for r in rows)  # no CPU peak

    real = ts.compile_model

    def perturbed(model, backend="inductor"):  # a compiled model that is not the same function
        compiled = real(model, backend)
        with torch.no_grad():
            compiled._orig_mod.lm_head.weight.mul_(1.5)
        return compiled

    monkeypatch.setattr(ts, "compile_model", perturbed)
    with pytest.raises(RuntimeError, match="does not compute the same function"):
        ts.run(**tiny)

    def failing_backend(graph_module, example_inputs):
        raise NotImplementedError("this backend cannot compile")

    def broken(model, backend="inductor"):  # a compile that fails: skipped with the reason, not a crash
        import copy

        return torch.compile(copy.deepcopy(model), backend=failing_backend)

    monkeypatch.setattr(ts, "compile_model", broken)
    with pytest.warns(RuntimeWarning, match="ours-compile failed"):
        rows = ts.run(**tiny)
    assert [r.provider for r in rows] == ["ours"] and rows.skipped[0].provider == "ours-compile"


def test_main_writes_one_report_naming_every_part_that_did_not_run(monkeypatch, tmp_path):
    """main()'s flow with the GPU work replaced (it needs CUDA): one report with the Time
    section, and every part not run listed under Skipped with its reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "machine", lambda device: {"device": "Fake GPU", "gpus": 1, "date": "2026-01-02 x"})
    ok = gpu_check.Check("layernorm", "5x33", "bf16", {"out0": 1e-3}, {"out0": 1e-3}, passed=True)
    monkeypatch.setattr(gpu_check, "correctness_checks", lambda device: [ok])

    def fake_benchmarks(device, quick, times, only=None):
        times["train-step"] = 2.0
        return [], ["train-step: transformers at *: not installed"]

    monkeypatch.setattr(gpu_check, "benchmarks", fake_benchmarks)
    monkeypatch.setattr(gpu_check, "candidate_part", lambda device: (
        ["| kernel | candidate |", "|---|---|", "| nf4.matmul_fwd | 64×64×64 w4 s3 |"],
        ["candidate timing: lora.skinny: no builder"]))
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-check_fake-gpu_2026-01-02.md").read_text()
    assert "## Autotune candidates" in text and "| nf4.matmul_fwd | 64×64×64 w4 s3 |" in text
    assert "- candidate timing: lora.skinny: no builder" in text
    assert "1/1 pass" in text and "| correctness |" in text and "| train-step | 2 | 150 |" in text
    assert "- scaling lab: needs at least 2 GPUs, found 1" in text and "- train-step: transformers" in text
    assert gpu_check.main(["--out", str(tmp_path), "--only", "train-step"]) == 0
    text = (tmp_path / "gpu-check_fake-gpu_2026-01-02.md").read_text()
    for part in ("correctness", "kernel benchmarks", "candidate timing", "scaling lab"):
        assert f"- {part}: not run (--only train-step)" in text
    assert "## Kernels" not in text and "| correctness |" not in text
