"""GPT-2: a decoder-only transformer (Radford et al. 2019), written for one device.

Architecture (GPT-2 as released, "Language Models are Unsupervised Multitask Learners" §2.3):

    h_0 = W_te[x] + W_pe[0..T)                            token + learned position embeddings
    for each of the L blocks (pre-LayerNorm residual stream):
        h = h + Attn(LN_1(h))                             causal multi-head self-attention
        h = h + MLP(LN_2(h)),  MLP(u) = W_2 · GELU(W_1 u) hidden width 4·d, tanh-GELU
    logits = LN_f(h) · W_teᵀ                              output head tied to the embedding

    Attn(u): q, k, v = split(u · W_qkv)                   (B, T, 3d) -> 3 x (B, nh, T, hs)
             a = softmax(q kᵀ / sqrt(hs) + causal mask) v  (Vaswani et al. 2017, eq. 1)
             out = concat_heads(a) · W_o

Initialization (GPT-2 §2.3): N(0, 0.02) for every weight and embedding, zero biases, and
the two projections that write into the residual stream (attention W_o and MLP W_2)
scaled by 1/sqrt(2·L), because each block adds two terms to the stream and the variance
of the sum would otherwise grow with depth.

Backends (`GPTConfig.backend`, one setting for the whole model): attention and the
LayerNorms call the ops of ltk/kernels/, which run PyTorch's own implementations
(`scaled_dot_product_attention`, `F.layer_norm`) on the `torch` backend and our fused
Triton kernels on the `triton` backend; `auto` picks Triton on CUDA. Each pre-norm block
hands its last residual add to the next block's LayerNorm, which fuses it
(`y, h = LN(x + delta)`): one read and write of the activations fewer per add.

Packed sequences (`segments`, ltk/training/packing.py): several examples share one row; equal
segment ids mark one example. Attention is then causal within each example only (a
block-diagonal of lower triangles) and the positions restart at 0 at each example's first
token, so every example's logits are exactly those it gets alone (Krell et al. 2021,
arXiv 2107.02027).

Parameter count and FLOPs are plain functions of the config (`num_params`,
`flops_per_token`) so cost models can use them without building the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ltk.kernels.attention import attention
from ltk.kernels.backend import BACKENDS, resolve_backend
from ltk.models.init import draw_init_seed, init_parameters, param_generator
from ltk.models.kv_cache import KVCache
from ltk.models.lm_head import LMHead, check_loss
from ltk.models.norms import LayerNorm
from ltk.models.param_groups import decay_groups
from ltk.models.pretrained import Pretrained


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # the tokenizer's vocabulary; 0 = take it from the data
    block_size: int = 1024  # longest sequence (number of learned positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    backend: str = "auto"  # kernels for attention and LayerNorm: auto | torch | triton
    loss: str = "auto"  # the LM head\'s loss: auto | full (logits built) | fused (ltk/models/lm_head.py)

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")
        check_loss(self.loss)


# name -> (n_layer, n_head, n_embd); GPT-2 sizes as released (the 350m is GPT-2 medium, etc.)
GPT_SIZES = {
    "gpt-debug": (4, 4, 128),
    "gpt2-124m": (12, 12, 768),
    "gpt2-350m": (24, 16, 1024),
    "gpt2-774m": (36, 20, 1280),
    "gpt2-1.5b": (48, 25, 1600),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    if name not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {name!r}; known: {sorted(GPT_SIZES)}")
    n_layer, n_head, n_embd = GPT_SIZES[name]
    base = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    if name == "gpt-debug":
        base.update(block_size=128, vocab_size=0)
    base.update(overrides)
    return GPTConfig(**base)


def num_params(cfg: GPTConfig) -> int:
    """Exact parameter count (tied head counted once). gpt2-124m, V=50257, T=1024: 124,439,808."""
    d, V, T, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    b = 1 if cfg.bias else 0
    ln = d + b * d
    attn = d * 3 * d + b * 3 * d + d * d + b * d
    mlp = d * 4 * d + b * 4 * d + 4 * d * d + b * d
    return V * d + T * d + L * (2 * ln + attn + mlp) + ln


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) positions that restart at 0 wherever the id changes:
    t − (first index of t's run). Each example of a packed row is one run of equal ids."""
    t = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


def check_segments(segments: torch.Tensor, idx: torch.Tensor, kv_cache) -> None:
    if kv_cache is not None:
        raise ValueError("segments (packed sequences) cannot be used with a kv_cache: decode each sequence "
                         "in its own row")
    if not isinstance(segments, torch.Tensor) or segments.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"segments must be an int32 or int64 tensor of segment ids, got "
                        f"{getattr(segments, 'dtype', type(segments).__name__)}")
    if segments.shape != idx.shape:
        raise ValueError(f"segments must have the shape of idx {tuple(idx.shape)}, got {tuple(segments.shape)}")


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·d·T (PaLM, Chowdhery et al.
    2022, appendix B). N counts the parameters that take part in matmuls: all but the
    position table (the tied embedding counts once, as the output head). The second term is
    the attention scores and weighted sum (2·2·T·d forward per layer, x3 with backward),
    counted for the full T x T matrix as PaLM does, although causal masking skips half."""
    T = seq_len or cfg.block_size
    n = num_params(cfg) - cfg.block_size * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * T


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.backend = cfg.backend
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.context_parallel = None  # set from outside: the sequence split over ranks (ltk/parallel/cp_train.py)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is not None:  # append this step's keys/values to the cached ones
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), S = cached + T
        p_drop = self.dropout if self.training else 0.0
        if p_drop > 0:  # dropout on the attention probabilities: only PyTorch's kernel has it
            if resolve_backend(self.backend, x) == "triton":
                raise ValueError("the triton attention kernel has no attention dropout: "
                                 "train with --model.dropout 0 or --model.backend torch")
            mask = None  # packed rows: causal within each segment, as a (B, 1, T, T) boolean mask
            if segments is not None:
                mask = (segments[:, None, :, None] == segments[:, None, None, :]).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p_drop)
        elif self.context_parallel is not None:  # this rank's shard against the whole sequence (ring / Ulysses)
            y = self.context_parallel.attention(q, k, v, causal=True, segment_ids=segments, backend=self.backend)
        else:
            y = attention(q, k, v, causal=True, segment_ids=segments, backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU (Hendrycks & Gimpel 2016, eq. 2)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias, backend=cfg.backend)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias, backend=cfg.backend)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0, segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream entering the block is x + delta (delta: the previous block's
        MLP output, whose add is fused into ln_1). Returns (h, delta') with the same meaning
        for the next block: h + delta' is this block's output."""
        y, h = (self.ln_1(x), x) if delta is None else self.ln_1(x, delta)
        # segments only when given: the tensor-parallel attention (ltk/parallel/tp_plan.py) takes none
        seg = {} if segments is None else {"segments": segments}
        y, h = self.ln_2(h, self.attn(y, kv_cache, layer, **seg))  # h = h + attn(LN_1(h)), fused with LN_2
        return h, self.mlp(y)


class GPT(Pretrained, nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.init_seed = draw_init_seed()  # before any submodule: the same whether built whole or on meta
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias, backend=cfg.backend)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False, loss=cfg.loss, backend=cfg.backend)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.activation_checkpointing = False
        self.context_parallel = None  # set from outside: idx is then this rank's sequence shard (cp_train.py)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_parameters(self, self.init_parameter)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        """Fill t as parameter `name` starts: N(0, 0.02²), residual projections N(0, (0.02/√(2L))²)
        (GPT-2, Radford et al. 2019 §2.3), LayerNorm gains 1, biases 0. A function of
        (init_seed, name) alone, so a shard can be made without the rest (ltk/models/init.py)."""
        gen = param_generator(self.init_seed, name, t.device)
        if name.endswith("c_proj.weight"):
            t.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer), generator=gen)
        elif name.endswith("bias"):
            t.zero_()
        elif ".ln_" in name or name.startswith("ln_f"):
            t.fill_(1.0)
        else:  # Linear weights and both embeddings
            t.normal_(0.0, 0.02, generator=gen)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to max_len (default block_size) positions."""
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, max_len or c.block_size, c.n_embd // c.n_head,
                       dtype=dtype or self.wte.weight.dtype, device=self.wte.weight.device)

    def forward(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                segments: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab_size); with targets (B, T), the mean
        cross-entropy instead (ltk/models/lm_head.py: `model.loss` fused never builds the logits).

        kv_cache   continue the sequences it holds (positions [length, length + T)).
        segments   (B, T) int ids of packed examples (e.g. 0 0 0 1 1 2 2 2), one run of equal ids
                   per example: each attends only to itself, causally, with positions from 0.
                   Not with kv_cache.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence length {start + T} exceeds the model's block_size {self.config.block_size}"
            )
        cp = self.context_parallel
        if cp is not None and segments is None and kv_cache is None:
            # the shard's global positions; padded ones (>= the real length) are clamped into the table:
            # their rows are masked in attention and ignored by the loss
            pos = cp.positions(cp.seq_len or T * cp.size, idx.device).clamp(max=self.config.block_size - 1)  # (T,)
        elif segments is None:
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        else:
            check_segments(segments, idx, kv_cache)
            pos = segment_positions(segments)  # (B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        delta = None  # a residual add not yet done: the next LayerNorm fuses it
        for i, block in enumerate(self.h):
            if self.activation_checkpointing and self.training and kv_cache is None:
                # keep one tensor per block for the recomputation, not two: do the deferred add here
                x = x if delta is None else x + delta
                x, delta = checkpoint(block, x, None, segments=segments, use_reentrant=False)
            else:
                x, delta = block(x, delta, kv_cache, i, segments)
        if kv_cache is not None:
            kv_cache.advance(T)
        y = self.ln_f(x) if delta is None else self.ln_f(x, delta)[0]
        return self.lm_head(y) if targets is None else self.lm_head(y, targets)  # (B, T, V) or the loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices (2-D weights, embeddings included), not biases
        or LayerNorm gains, which have no scale to regularize."""
        return decay_groups(self, weight_decay)
