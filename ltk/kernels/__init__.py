"""Triton kernels, one op a file, each beside its PyTorch reference and its cost model.

    kernels.attention(q, k, v, *, causal, softmax_scale, key_padding_mask, bias, backend)
    kernels.layer_norm(x, weight, bias, eps, backend)      kernels.layer_norm_residual(...)
    kernels.rms_norm(x, weight, eps, backend)              kernels.rms_norm_residual(...)
    kernels.fused_linear_cross_entropy(h, weight, target, bias, *, ignore_index, label_smoothing,
                                       z_loss, softcap, reduction, chunk_rows, memory_budget, backend)
    kernels.cross_entropy.cross_entropy(logits, target, ...)   (the module; see below for why)

`backend`: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton" (on a CPU only
under TRITON_INTERPRET=1); see ltk/kernels/backend.py. The cost models (`flops`, `bytes_moved`)
live in each op's module: `from kernels.attention import flops`. Since `kernels.attention`
is the function, the attention *module* is reached with `from kernels.attention import ...`
or `importlib.import_module("ltk.kernels.attention")`, not as an attribute of the package.
The cross-entropy function is not re-exported, so `ltk.kernels.cross_entropy` stays the module.

Name clash to know about: Hugging Face's hub-kernel loader is also imported as `kernels`.
transformers only switches it on for a `kernels` distribution at version 0.18 or later, and
it finds this package under the distribution `llm-training-toolkit`, whose version stays
below that (tests/unit/test_packaging.py checks it).
"""
from ltk.kernels.attention import attention, attention_reference
from ltk.kernels.fused_linear_ce import fused_linear_cross_entropy
from ltk.kernels.layernorm import layer_norm, layer_norm_reference, layer_norm_residual
from ltk.kernels.rmsnorm import rms_norm, rms_norm_reference, rms_norm_residual

__all__ = [
    "attention", "attention_reference", "fused_linear_cross_entropy", "layer_norm", "layer_norm_reference",
    "layer_norm_residual",
    "rms_norm", "rms_norm_reference", "rms_norm_residual",
]
