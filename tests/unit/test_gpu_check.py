"""The GPU check script's own logic, exercised on a CPU through the Triton interpreter
(the real run needs CUDA and happens on a GPU machine)."""
import pytest
import torch

from bench import gpu_check
from kernels.attention import attention
from kernels.layernorm import layer_norm


def test_compare_passes_a_correct_kernel_and_fails_a_wrong_one(monkeypatch):
    x, w, b = torch.randn(5, 33), torch.randn(33), torch.randn(33)
    for t in (x, w, b):
        t.requires_grad_(True)
    ok = gpu_check._compare("layernorm", "5x33", "fp16", lambda t, be: layer_norm(t[0], t[1], t[2], backend=be), [x, w, b])
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
    from kernels.backend import HAS_TRITON, interpreter_on

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
