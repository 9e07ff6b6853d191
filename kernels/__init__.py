"""Triton kernels, one op a file, each beside its PyTorch reference and its cost model
(fused attention, LayerNorm, RMSNorm, LoRA and NF4 matmuls). Nothing is exported yet: the
first kernels land with the attention / normalization work.

Name clash to know about: Hugging Face's hub-kernel loader is also imported as `kernels`.
transformers only switches it on for a `kernels` distribution at version 0.18 or later, and
it finds this package under the distribution `llm-training-toolkit`, whose version stays
below that (tests/unit/test_packaging.py checks it).
"""
