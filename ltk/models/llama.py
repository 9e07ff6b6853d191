"""Llama: a decoder-only transformer with RMSNorm, rotary positions, grouped-query
attention and a SwiGLU MLP (Touvron et al. 2023, "LLaMA", §2.2; Llama 2 and 3 keep the
design), written for one device.

Architecture:

    h_0 = W_emb[x]                                       token embedding, no position table
    for each of the L blocks (pre-norm residual stream):
        h = h + Attn(RMSNorm_1(h))                       causal GQA self-attention with RoPE
        h = h + MLP(RMSNorm_2(h))                        SwiGLU
    logits = RMSNorm_f(h) · W_outᵀ                       untied output head (tied in Llama-3.2-1B)

    RMSNorm(x) = x / sqrt(mean(x²) + eps) ∘ g            (Zhang & Sennrich 2019, eq. 4)

    MLP(u) = W_2 (silu(W_1 u) ∘ W_3 u)                   SwiGLU (Shazeer 2020, "GLU Variants
                                                         Improve Transformer", eq. 6), hidden width
                                                         `intermediate_size`; silu(z) = z·σ(z)

    Attn(u): q = u W_q  (H heads),  k = u W_k,  v = u W_v  (H_kv heads each, head dim D = d / H)
             q, k = RoPE(q, pos), RoPE(k, pos)
             a = softmax(q kᵀ / sqrt(D) + causal mask) v  query head h reads kv head h // (H / H_kv)
             out = concat_heads(a) · W_o

Grouped-query attention (Ainslie et al. 2023, "GQA", §2.2): H query heads share H_kv ≤ H
key/value heads in groups of H / H_kv. H_kv = H is ordinary multi-head attention, H_kv = 1
multi-query attention. It cuts the KV cache (and the K/V projections) by H / H_kv, which is
what limits the batch size when decoding. ltk/kernels/attention.py handles the sharing itself,
so K and V are never copied H / H_kv times.

Rotary position embedding (Su et al. 2021, "RoFormer", §3.4.2, eq. 34): the dimensions of
each query and key head are split into D/2 pairs, and pair i at position m is rotated by
the angle m·θ_i, θ_i = base^(−2i/D) (base = `rope_theta`):

    [x_a']   [cos mθ_i  −sin mθ_i] [x_a]
    [x_b'] = [sin mθ_i   cos mθ_i] [x_b]

so q_m · k_n depends on m − n only: attention sees relative positions. Which dimensions
form a pair is a convention. The paper (and Meta's checkpoints) pair neighbours (2i, 2i+1);
here, as in transformers, pair i is (i, i + D/2), the "rotate half" layout:

    x' = x ∘ cos + rotate_half(x) ∘ sin,   rotate_half([x_1, x_2]) = [−x_2, x_1]
    cos = [cos mθ_0 .. cos mθ_{D/2−1}, cos mθ_0 .. cos mθ_{D/2−1}]   (sin likewise)

Hugging Face checkpoints are stored for this layout (their conversion script permuted
W_q and W_k once), so they load here without any permutation. The angles are computed
from the positions on every forward (D/2 · T numbers, negligible), so the model has no
buffers and builds on the meta device like any other.

KV cache (for generation): a `KVCache` keeps, per layer, preallocated K and V tensors of
shape (B, H_kv, max_len, D) and the number of positions already written. A forward with
the cache writes the new keys and values at [length, length + T), attends the T new
queries to all length + T keys (ltk/kernels/attention.py's causal mask is bottom-right aligned,
so query i sees keys j ≤ length + i), and advances length by T. Decoding one token then
costs O(length) instead of re-running the whole context, O(length²).

Packed sequences (`segments`, as ltk/models/gpt.py): equal ids mark one example of a packed row;
attention stays inside each example (causally) and the RoPE positions restart at 0 at each
example's first token, so each example's logits equal those it gets alone. (Inside the mask
the restart changes only rounding, as q_m · k_n depends on m − n alone; it gives each example
the very angles it has alone.)

Initialization (as GPT-2 / ltk/models/gpt.py): N(0, 0.02) for every weight and embedding, the
two projections that write into the residual stream (W_o and W_2) scaled by 1/sqrt(2·L),
RMSNorm gains at 1.

Backends (`LlamaConfig.backend`): attention, RMSNorm, RoPE and SwiGLU call the ops of ltk/kernels/
(PyTorch on `torch`, our fused Triton kernels on `triton`, `auto` = Triton on CUDA; the Triton
RoPE rotates q and k in place). Each block
hands its last residual add to the next block's RMSNorm, which fuses it (`y, h = norm(x + delta)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ltk.kernels.attention import attention
from ltk.kernels.backend import BACKENDS, resolve_backend
from ltk.kernels.rope import apply_rope as rope_qk
from ltk.kernels.rope import rope_reference
from ltk.kernels.swiglu import swiglu
from ltk.models.gpt import check_segments, segment_positions
from ltk.models.init import draw_init_seed, init_parameters, param_generator
from ltk.models.kv_cache import KVCache
from ltk.models.lm_head import LMHead, check_loss
from ltk.models.norms import RMSNorm
from ltk.models.param_groups import decay_groups
from ltk.models.pretrained import Pretrained


@dataclass
class LlamaConfig:
    vocab_size: int = 128256  # the tokenizer's vocabulary; 0 = take it from the data
    block_size: int = 8192  # longest sequence (max positions; RoPE itself has no table)
    n_layer: int = 32
    n_head: int = 32  # query heads H
    n_kv_head: int = 8  # key/value heads H_kv (divides n_head); = n_head: no GQA
    n_embd: int = 4096  # model width d; head dim D = d / H
    intermediate_size: int = 14336  # SwiGLU hidden width
    rope_theta: float = 500000.0  # RoPE base
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output head shares the embedding matrix (Llama-3.2-1B/3B)
    backend: str = "auto"  # kernels for attention, RMSNorm, RoPE, SwiGLU: auto | torch | triton
    loss: str = "auto"  # the LM head\'s loss: auto | full (logits built) | fused (ltk/models/lm_head.py)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs: the head dim model.n_embd / model.n_head = "
                             f"{self.head_dim} must be even")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")
        check_loss(self.loss)


# name -> fields. llama-1b is Llama-3.2-1B, llama-8b is Llama-3-8B (without Llama 3.1's
# rope scaling, which is out of scope here).
LLAMA_SIZES = {
    "llama-debug": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352,
                        vocab_size=0, block_size=128, rope_theta=10000.0),
    "llama-1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                     vocab_size=128256, block_size=131072, tie_embeddings=True),
    "llama-8b": dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                     vocab_size=128256, block_size=8192),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    if name not in LLAMA_SIZES:
        raise ValueError(f"unknown Llama size {name!r}; known: {sorted(LLAMA_SIZES)}")
    return LlamaConfig(**{**LLAMA_SIZES[name], **overrides})


def num_params(cfg: LlamaConfig) -> int:
    """Exact parameter count (a tied head counted once). llama-8b: 8,030,261,248;
    llama-1b: 1,235,814,400."""
    d, V, L, I = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.intermediate_size
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    attn = d * q_dim + 2 * d * kv_dim + q_dim * d  # W_q, W_k, W_v, W_o
    mlp = 3 * d * I  # W_1, W_3 (d -> I), W_2 (I -> d)
    embeddings = V * d if cfg.tie_embeddings else 2 * V * d
    return embeddings + L * (2 * d + attn + mlp) + d  # 2 RMSNorm gains per block, 1 final


def flops_per_token(cfg: LlamaConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·d·T (PaLM, Chowdhery et al.
    2022, appendix B), as ltk/models/gpt.py. N counts the parameters that take part in matmuls:
    the projections of every block and the output head; not the RMSNorm gains, nor an untied
    input embedding (a table lookup). The second term is the attention scores and weighted
    sum over the full T x T matrix (H·D = d, so GQA does not change it)."""
    T = seq_len or cfg.block_size
    d = cfg.n_embd
    n = num_params(cfg) - (2 * cfg.n_layer + 1) * d  # minus the RMSNorm gains
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * d  # the input embedding is a lookup
    return 6.0 * n + 12.0 * cfg.n_layer * d * T


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the RoPE angles m·θ_i, θ_i = theta^(−2i/D), for integer positions m of
    any shape (...,) -> two (..., D) float32 tensors in the rotate-half layout (each of the
    D/2 angles appears twice: at i and at i + D/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    return angles.cos(), angles.sin()


# the single-tensor reference, x (B, heads, T, D) -> RoPE(x): ltk/kernels/rope.py's, kept under its old
# name for the callers that rotate one tensor (ltk/parallel/tp_plan.py)
apply_rope = rope_reference


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.backend = cfg.backend
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.context_parallel = None  # set from outside: the sequence split over ranks (ltk/parallel/cp_train.py)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, layer: int = 0,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads·D) -> (B, heads, T, D)
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        # in place on the triton backend: q and k are fresh projections, nothing else reads them
        q, k = rope_qk(q, k, cos, sin, inplace=resolve_backend(self.backend, q) == "triton", backend=self.backend)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H_kv, S, D), S = cached + T
        if self.context_parallel is not None:  # this rank's shard against the whole sequence (ring / Ulysses)
            y = self.context_parallel.attention(q, k, v, causal=True, segment_ids=segments, backend=self.backend)
        else:
            y = attention(q, k, v, causal=True, segment_ids=segments, backend=self.backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H·D)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)  # down
        self.backend = cfg.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), backend=self.backend))  # Shazeer 2020, eq. 6


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer  # this block's slot in a KV cache
        self.attn_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, delta, cos, sin, kv_cache: KVCache | None = None, segments: torch.Tensor | None = None):
        """The residual stream entering the block is x + delta (delta: the previous block's
        MLP output, whose add is fused into attn_norm). Returns (h, delta') with the same
        meaning for the next block."""
        y, h = (self.attn_norm(x), x) if delta is None else self.attn_norm(x, delta)
        # segments only when given: the tensor-parallel attention (ltk/parallel/tp_plan.py) takes none
        seg = {} if segments is None else {"segments": segments}
        y, h = self.mlp_norm(h, self.attn(y, cos, sin, kv_cache, self.layer, **seg))  # h += attn, fused
        return h, self.mlp(y)


class Llama(Pretrained, nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.init_seed = draw_init_seed()  # before any submodule: the same whether built whole or on meta
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)
        self.output = LMHead(cfg.n_embd, cfg.vocab_size, bias=False, loss=cfg.loss, backend=cfg.backend)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # Press & Wolf 2017
        self.activation_checkpointing = False
        self.context_parallel = None  # set from outside: idx is then this rank's sequence shard (cp_train.py)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_parameters(self, self.init_parameter)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        """Fill t as parameter `name` starts (a function of (init_seed, name): ltk/models/init.py)."""
        gen = param_generator(self.init_seed, name, t.device)
        if name.endswith("wo.weight") or name.endswith("w2.weight"):
            t.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer), generator=gen)
        elif "norm" in name:
            t.fill_(1.0)
        else:  # the other projections, the embedding and the head
            t.normal_(0.0, 0.02, generator=gen)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to max_len (default block_size) positions."""
        cfg, w = self.config, self.tok_embeddings.weight
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       dtype=dtype or w.dtype, device=w.device)

    def forward(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab_size); with targets (B, T), the mean
        cross-entropy instead (ltk/models/lm_head.py: `model.loss` fused never builds the logits).

        kv_cache   continue the sequences it holds: idx are positions [length, length + T),
                   attended together with the cached ones; the cache advances by T.
        positions  (T,) or (B, T) position ids for RoPE; default length + [0, T), or with
                   segments, 0 at the first token of each segment.
        segments   (B, T) int ids of packed examples (e.g. 0 0 0 1 1 2 2 2), one run of equal ids
                   per example: each attends only to itself, causally. Not with kv_cache.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if segments is not None:
            check_segments(segments, idx, kv_cache)
            if positions is None:
                positions = segment_positions(segments)  # (B, T)
        cp = self.context_parallel
        if positions is None and cp is not None and kv_cache is None:  # the shard's global positions
            positions = cp.positions(cp.seq_len or T * cp.size, idx.device)  # (T,)
        if positions is None:
            if start + T > self.config.block_size:
                raise ValueError(f"positions up to {start + T} exceed the model's block_size "
                                 f"{self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (.., T, D)
        if cos.dim() == 3:  # per-sequence positions (B, T, D) -> (B, 1, T, D), broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        x = self.tok_embeddings(idx)  # (B, T, d)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        delta = None  # a residual add not yet done: the next RMSNorm fuses it
        for block in self.layers:
            if self.activation_checkpointing and self.training and kv_cache is None:
                # keep one tensor per block for the recomputation, not two: do the deferred add here
                x = x if delta is None else x + delta
                x, delta = checkpoint(block, x, None, cos, sin, segments=segments, use_reentrant=False)
            else:
                x, delta = block(x, delta, cos, sin, kv_cache, segments)
        if kv_cache is not None:
            kv_cache.advance(T)
        y = self.norm(x) if delta is None else self.norm(x, delta)[0]
        return self.output(y) if targets is None else self.output(y, targets)  # (B, T, V) or the loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices (2-D weights, embedding included), not the
        RMSNorm gains, which have no scale to regularize."""
        return decay_groups(self, weight_decay)
