"""T5: the text-to-text encoder-decoder transformer (Raffel et al. 2020), written for one device.

"Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (JMLR 2020,
arXiv 1910.10683), §2.1. An encoder reads the input; a decoder writes the output one token at a
time, reading the encoder's states through cross-attention. Both stacks are pre-norm:

    shared embedding E (V, d), used by encoder, decoder and (T5 1.0) the output head

    encoder, h_0 = E[x]:
        h = h + SelfAttn(RMS(h), bias = B_bi)          bidirectional, key padding mask
        h = h + FF(RMS(h))
    enc = RMS_f(h_L)

    decoder, g_0 = E[y_shifted]:
        g = g + SelfAttn(RMS(g), bias = B_uni)         causal
        g = g + CrossAttn(RMS(g), enc)                 keys/values from enc, encoder padding mask
        g = g + FF(RMS(g))
    out = RMS_f(g_L)
    logits = (d^-1/2 · out) Eᵀ       tied head (T5 1.0: the rescale keeps logits O(1), since E ~ N(0, 1))
    logits = out W_lmᵀ               untied head (T5 1.1)

"LayerNorm" in T5 is RMSNorm (Zhang & Sennrich 2019, eq. 4): y = x / sqrt(mean(x²) + ε) · w, no
mean, no bias. No Linear in T5 has a bias.

Attention (Vaswani et al. 2017, eq. 1, without the 1/sqrt(d_kv)):

    A = softmax(q kᵀ + B + M) v          q = u W_q, k = c W_k, v = c W_v,  out = concat_heads(A) W_o

The scores are NOT scaled by 1/sqrt(d_kv): Mesh TensorFlow folds that factor into the
initialization of W_q instead (see below), so the checkpoints expect softmax_scale = 1.

Relative position bias (Shaw et al. 2018, "Self-Attention with Relative Position
Representations", arXiv 1803.02155, reduced by T5 to one learned scalar per head and per bucket of
relative distance, §2.1 of Raffel et al.): B[h, i, j] = b[bucket(j − i), h]. Distances are put in
`num_buckets` buckets: half of them (per direction) exact for small |j − i|, the rest
logarithmically spaced up to `max_distance`, beyond which all distances share the last bucket
(`relative_position_bucket` below). The encoder uses bidirectional buckets (half for j > i, half
for j ≤ i); the decoder's self-attention unidirectional ones (only j ≤ i occurs). The bias is
computed once per stack, from the table of the first layer, and added in every layer of that stack;
cross-attention has none. No absolute positions anywhere.

Feed-forward: T5 1.0 FF(u) = W_o ReLU(W_i u); T5 1.1 ("gated-gelu", Shazeer 2020, "GLU Variants
Improve Transformer", arXiv 2002.05202, eq. 6) FF(u) = W_o (GELU_tanh(W_i0 u) ∘ W_i1 u).

Initialization (Mesh TensorFlow, as transformers' T5 does; factor = 1):
    E, untied W_lm ~ N(0, 1)                   the tied head's d^-1/2 rescale compensates
    W_q ~ N(0, (d · d_kv)^-1/2)                includes the 1/sqrt(d_kv) the scores do not apply
    W_k, W_v ~ N(0, d^-1/2)                    unit-variance q·k terms for unit-variance inputs
    W_o ~ N(0, (n_head · d_kv)^-1/2)
    W_i, W_i0, W_i1 ~ N(0, d^-1/2),  FF W_o ~ N(0, d_ff^-1/2)
    relative bias tables ~ N(0, d^-1/2),  RMSNorm gains = 1

Dropout (p = `dropout`) where transformers' T5 puts it: after the embedding, on the attention
probabilities, inside the FF, on each sublayer's output before the residual add, after each final
norm. Attention dropout runs through PyTorch's SDPA (the Triton kernel has none).

Backends (`T5Config.backend`): RMSNorm, attention and T5 1.1's GeGLU call the ops of ltk/kernels/
(PyTorch's own on `torch`, our Triton kernels on `triton`, `auto` = Triton on CUDA). The relative bias is passed to
the attention op as its additive `bias` and receives its gradient from it. As in ltk/models/gpt.py,
each pre-norm sublayer hands its residual add to the next RMSNorm, which fuses it.

Greedy decoding (`generate_greedy`) runs the encoder once and re-runs the decoder on the growing
prefix (no KV cache: O(T²) per token, simple and exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.kernels.attention import attention
from ltk.kernels.backend import BACKENDS, resolve_backend
from ltk.kernels.swiglu import geglu
from ltk.models.init import draw_init_seed, init_parameters, param_generator
from ltk.models.lm_head import LMHead, check_loss, head_loss
from ltk.models.norms import RMSNorm
from ltk.models.param_groups import decay_groups
from ltk.models.pretrained import Pretrained

FEED_FORWARDS = ("relu", "gated-gelu")


@dataclass
class T5Config:
    vocab_size: int = 32128  # the tokenizer's vocabulary (sentinels included); 0 = take it from the data
    d_model: int = 512
    d_kv: int = 64  # per-head width; n_head · d_kv need not equal d_model
    d_ff: int = 2048
    n_layer: int = 6  # encoder blocks
    n_decoder_layer: int = 6
    n_head: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.0
    norm_eps: float = 1e-6
    feed_forward: str = "relu"  # "relu" (T5 1.0) | "gated-gelu" (T5 1.1)
    tie_embeddings: bool = True  # T5 1.0 ties the output head to the embedding; 1.1 does not
    backend: str = "auto"  # kernels for attention, RMSNorm, GeGLU: auto | torch | triton
    loss: str = "auto"  # the LM head\'s loss: auto | full (logits built) | fused (ltk/models/lm_head.py)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "n_layer", "n_decoder_layer", "n_head",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("model.relative_attention_num_buckets must be at least 4 "
                             f"(exact and log buckets in both directions), got {self.relative_attention_num_buckets}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(f"model.feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")
        check_loss(self.loss)


# name -> fields; sizes as released by Raffel et al. 2020 (Table 14) and for T5 1.1
T5_PRESETS = {
    "t5-debug": dict(vocab_size=0, d_model=64, d_kv=16, d_ff=128, n_layer=2, n_decoder_layer=2, n_head=4),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, n_layer=6, n_decoder_layer=6, n_head=8),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, n_layer=12, n_decoder_layer=12, n_head=12),
    "t5-v1_1-small": dict(d_model=512, d_kv=64, d_ff=1024, n_layer=8, n_decoder_layer=8, n_head=6,
                          feed_forward="gated-gelu", tie_embeddings=False),
}


def t5_config(name: str, **overrides) -> T5Config:
    if name not in T5_PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; known: {sorted(T5_PRESETS)}")
    return T5Config(**{**T5_PRESETS[name], **overrides})


def num_params(cfg: T5Config) -> int:
    """Exact parameter count (a tied head counted once). t5-small: 60,506,624; t5-base: 222,903,552."""
    d, inner = cfg.d_model, cfg.n_head * cfg.d_kv
    attn = 4 * d * inner  # W_q, W_k, W_v (d -> inner), W_o (inner -> d)
    ff = (3 if cfg.feed_forward == "gated-gelu" else 2) * d * cfg.d_ff
    rel = cfg.relative_attention_num_buckets * cfg.n_head  # one table per stack
    encoder = cfg.n_layer * (2 * d + attn + ff) + d + rel
    decoder = cfg.n_decoder_layer * (3 * d + 2 * attn + ff) + d + rel
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + encoder + decoder + head


def train_flops(cfg: T5Config, enc_len: int, dec_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) for one example of enc_len encoder and
    dec_len decoder tokens — the encoder-decoder form of PaLM's 6N + 12·L·d·T (Chowdhery et al.
    2022, appendix B), with inner = n_head·d_kv:

        6·(N_enc·T_e + N_dec·T_d + N_kv·T_e + V·d·T_d)           every projection, and the head
      + 12·inner·(L_e·T_e² + L_d·T_d² + L_d·T_d·T_e)            scores + weighted sums:
                                                                encoder self, decoder self, cross
    N_enc = L_e·(4·d·inner + FF), N_dec = L_d·(6·d·inner + FF) (self q,k,v,o + cross q,o),
    N_kv = L_d·2·d·inner (cross-attention keys and values, computed from the encoder's T_e
    states), FF = (2 or 3)·d·d_ff. Lookups (embedding, relative bias) and norms are not matmuls
    and are not counted."""
    d, inner = cfg.d_model, cfg.n_head * cfg.d_kv
    ff = (3 if cfg.feed_forward == "gated-gelu" else 2) * d * cfg.d_ff
    n_enc, n_dec = cfg.n_layer * (4 * d * inner + ff), cfg.n_decoder_layer * (6 * d * inner + ff)
    n_kv = cfg.n_decoder_layer * 2 * d * inner
    proj = 6.0 * (n_enc * enc_len + n_dec * dec_len + n_kv * enc_len + cfg.vocab_size * d * dec_len)
    attn = 12.0 * inner * (cfg.n_layer * enc_len**2 + cfg.n_decoder_layer * (dec_len**2 + dec_len * enc_len))
    return proj + attn


def span_counts(n: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) that T5's span corruption picks in n tokens (the objective is
    ltk/training/span_corruption.py; the counts live here because the FLOP count needs them too)."""
    n_noise = min(max(round(n * noise_density), 1), n - 1)
    spans = min(max(1, round(n_noise / mean_span_length)), n_noise, n - n_noise)  # each span >= 1 token
    return n_noise, spans


def span_corruption_lengths(n: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(encoder, decoder) lengths span corruption makes of n text tokens: n − noise + spans + 1
    (kept tokens, a sentinel per span, EOS) and noise + spans + 2 (sentinels, dropped tokens, the
    closing sentinel, EOS) — the same for every row."""
    n_noise, spans = span_counts(n, noise_density, mean_span_length)
    return n - n_noise + spans + 1, n_noise + spans + 2


def flops_per_token(cfg: T5Config, seq_len: int | None = None) -> float:
    """Training FLOPs per token of text under span corruption (the unit `ltk train` counts:
    seq_len text tokens per row become a shorter input and a much shorter target)."""
    n = seq_len or 512
    return train_flops(cfg, *span_corruption_lengths(n)) / n


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Map relative positions r = j − i (key minus query) to bucket ids in [0, num_buckets).

    Bidirectional: half of the buckets for r > 0, half for r ≤ 0, then |r| is bucketed.
    Unidirectional (causal): only r ≤ 0 can occur, bucket −r (r > 0 is clamped to 0).
    Within a direction with n buckets: |r| < n/2 gets its own bucket; larger |r| gets
        n/2 + floor(log(|r| / (n/2)) / log(max_distance / (n/2)) · (n − n/2)),  at most n − 1,
    i.e. logarithmically wider buckets up to max_distance, all farther distances in the last one.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only avoids log(0) in the lanes that `is_small` replaces anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """The learned table b (num_buckets, n_head) of one stack and its lookup B[h, i, j] = b[bucket(j − i), h]."""

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.weight = nn.Parameter(torch.empty(self.num_buckets, cfg.n_head))

    def forward(self, T: int, S: int) -> torch.Tensor:
        """Bias for T queries at positions 0..T-1 over S keys at 0..S-1 -> (1, nh, T, S)."""
        i = torch.arange(T, device=self.weight.device)[:, None]
        j = torch.arange(S, device=self.weight.device)[None, :]
        buckets = relative_position_bucket(j - i, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)  # (T, S)
        bias = F.embedding(buckets, self.weight)  # (T, S, nh)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nh, T, S)


def _attention_with_dropout(q, k, v, *, causal, key_padding_mask, bias, p_drop):
    """Training path with attention dropout (PyTorch's SDPA): the masks folded into the additive bias."""
    B, _, T, _ = q.shape
    S = k.shape[2]
    mask = torch.zeros(1, 1, T, S, dtype=q.dtype, device=q.device) if bias is None else bias.to(q.dtype)
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # bottom-right aligned
        mask = mask.masked_fill(~allowed, float("-inf"))
    if key_padding_mask is not None:
        mask = mask.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))  # (B, nh|1, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, scale=1.0)


class T5Attention(nn.Module):
    """Multi-head attention without score scaling; self-attention when `context` is None,
    cross-attention (keys and values from the encoder output) otherwise."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.n_head, self.d_kv = cfg.n_head, cfg.d_kv
        self.dropout, self.backend = cfg.dropout, cfg.backend
        inner = cfg.n_head * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.d_kv).transpose(1, 2)  # (B, T, nh·hs) -> (B, nh, T, hs)

    def forward(self, x, context=None, *, bias=None, key_padding_mask=None, causal=False) -> torch.Tensor:
        B, T, _ = x.shape
        source = x if context is None else context
        q, k, v = self._heads(self.q(x)), self._heads(self.k(source)), self._heads(self.v(source))
        p_drop = self.dropout if self.training else 0.0
        if p_drop > 0:
            if resolve_backend(self.backend, x) == "triton":
                raise ValueError("the triton attention kernel has no attention dropout: "
                                 "train with --model.dropout 0 or --model.backend torch")
            y = _attention_with_dropout(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                        bias=bias, p_drop=p_drop)
        else:
            y = attention(q, k, v, causal=causal, softmax_scale=1.0, key_padding_mask=key_padding_mask,
                          bias=bias, backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.d_kv)  # (B, T, nh·hs)
        return self.o(y)


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.feed_forward == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.backend = cfg.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # GEGLU with the tanh approximation of GELU (Hendrycks & Gimpel 2016, eq. 2)
            hidden = geglu(self.wi_0(x), self.wi_1(x), approximate="tanh", backend=self.backend)
        else:
            hidden = F.relu(self.wi(x))
        return self.wo(self.dropout(hidden))


class T5Block(nn.Module):
    """One encoder block (self-attention, FF) or decoder block (causal self-attention,
    cross-attention, FF), each sublayer pre-norm with a residual add."""

    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, backend=cfg.backend)
        self.attn = T5Attention(cfg)
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps, backend=cfg.backend)
            self.cross_attn = T5Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps, backend=cfg.backend)
        self.ff = T5FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h, delta, *, bias, mask, context=None, context_mask=None):
        """The stream entering the block is h + delta (delta: the previous sublayer's output,
        whose add the next RMSNorm fuses). Returns (h, delta') with the same meaning."""
        y, h = (self.attn_norm(h), h) if delta is None else self.attn_norm(h, delta)
        delta = self.drop(self.attn(y, bias=bias, key_padding_mask=mask, causal=self.is_decoder))
        if self.is_decoder:
            y, h = self.cross_norm(h, delta)
            delta = self.drop(self.cross_attn(y, context, key_padding_mask=context_mask))
        y, h = self.ff_norm(h, delta)
        return h, self.drop(self.ff(y))


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks, one relative-bias table shared by all of them, final norm."""

    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        n = cfg.n_decoder_layer if is_decoder else cfg.n_layer
        self.relative_bias = RelativePositionBias(cfg, bidirectional=not is_decoder)
        self.blocks = nn.ModuleList(T5Block(cfg, is_decoder) for _ in range(n))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, backend=cfg.backend)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, context=None, context_mask=None) -> torch.Tensor:
        """x: (B, T, d) embedded tokens; mask: bool (B, T), True at real tokens -> (B, T, d)."""
        T = x.shape[1]
        bias = self.relative_bias(T, T)  # (1, nh, T, T), computed once for all blocks
        h, delta = self.drop(x), None
        for block in self.blocks:
            h, delta = block(h, delta, bias=bias, mask=mask, context=context, context_mask=context_mask)
        return self.drop(self.final_norm(h, delta)[0])


def _as_mask(mask: torch.Tensor | None, ids: torch.Tensor, name: str) -> torch.Tensor | None:
    """An attention mask as the attention op wants it: bool (B, T), True where attendable."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} must have the shape of its ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return mask.bool()


class T5(Pretrained, nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        cfg.validate()
        self.init_seed = draw_init_seed()  # before any submodule: the same whether built whole or on meta
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.d_model, cfg.vocab_size, bias=False, loss=cfg.loss,
                                                                 backend=cfg.backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_parameters(self, self.init_parameter)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        """Mesh TensorFlow's initialization (standard deviations in the module docstring), as a
        function of (init_seed, name) alone (ltk/models/init.py)."""
        cfg = self.config
        d, inner = cfg.d_model, cfg.n_head * cfg.d_kv
        std = {"q": (d * cfg.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5,
               "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": cfg.d_ff ** -0.5,
               "relative_bias": d ** -0.5, "shared": 1.0, "lm_head": 1.0}
        parts = name.split(".")
        if "norm" in parts[-2]:
            t.fill_(1.0)
        else:  # the module's own name decides: ...attn.q.weight -> "q"
            t.normal_(0.0, std[parts[-2]], generator=param_generator(self.init_seed, name, t.device))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder output (B, S, d). attention_mask: 1/True at real tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
        return self.encoder(self.shared(input_ids), _as_mask(attention_mask, input_ids, "attention_mask"))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None, *,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids (B, T), encoder_out (B, S, d) -> logits (B, T, V); with targets (B, T)
        (-100 where not scored), the mean loss instead (ltk/models/lm_head.py).
        attention_mask is the encoder's (B, S) padding mask, used by cross-attention."""
        if decoder_input_ids.dim() != 2:
            raise ValueError(f"decoder_input_ids must have shape (batch, time), got {tuple(decoder_input_ids.shape)}")
        enc_mask = None if attention_mask is None else attention_mask.bool()
        out = self.decoder(self.shared(decoder_input_ids),
                           _as_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask"),
                           context=encoder_out, context_mask=enc_mask)  # (B, T, d)
        if self.lm_head is None:  # tied: rescale by d^-1/2, as Mesh TensorFlow does
            out = out * self.config.d_model ** -0.5
            if targets is not None:
                return head_loss(out, self.shared.weight, targets, loss=self.config.loss, backend=self.config.backend)
            return F.linear(out, self.shared.weight)  # (B, T, V)
        return self.lm_head(out) if targets is None else self.lm_head(out, targets)  # (B, T, V) or the loss

    def forward(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None, *,
                targets=None):
        """Teacher forcing: logits (B, T, V) of the decoder given the whole target prefix, or with
        targets (B, T) the mean loss. decoder_input_ids are the targets shifted right with the
        start token (pad, id 0) first."""
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask, targets=targets)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                        attention_mask: torch.Tensor | None = None, decoder_start_token_id: int = 0,
                        eos_id: int | None = 1, pad_id: int = 0) -> torch.Tensor:
        """Greedy decoding: the encoder runs once; each step re-runs the decoder on the prefix
        and appends argmax of the last position. Returns (B, 1 + n), start token first,
        n <= max_new_tokens; a sequence that has produced eos_id continues with pad_id, and the
        loop stops when all have (as transformers' generate does)."""
        was_training = self.training
        self.eval()
        encoder_out = self.encode(input_ids, attention_mask)  # (B, S, d), once
        B = input_ids.shape[0]
        out = torch.full((B, 1), decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, encoder_out, attention_mask)[:, -1, :]  # (B, V)
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
        self.train(was_training)
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices (2-D weights, embeddings and bias tables included),
        not the RMSNorm gains."""
        return decay_groups(self, weight_decay)
