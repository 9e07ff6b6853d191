"""BERT: a bidirectional transformer encoder (Devlin et al. 2019), written for one device.

"BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
(arXiv 1810.04805). The encoder is the one of "Attention Is All You Need" (Vaswani et al.
2017, §3.1): every token attends to every other real token, left and right, and each
sublayer is followed by its residual add and a LayerNorm (post-LN).

    e   = W_word[x] + W_pos[0..T) + W_type[s]              three embeddings summed (BERT §3, fig. 2)
    h_0 = Dropout(LN_e(e))
    for each of the L layers (post-LayerNorm residual, Vaswani et al. §3.1):
        h = LN_1(h + Dropout(Attn(h)))                     bidirectional self-attention, padding masked
        h = LN_2(h + Dropout(W_2 · GELU(W_1 h)))           hidden width I (4·d in the paper), erf-GELU

    Attn(u): q, k, v = split(u · W_qkv)                    (B, T, 3d) -> 3 x (B, nh, T, hs)
             a = softmax(q kᵀ / sqrt(hs) + M) v             M_ij = −inf where key j is padding
             out = concat_heads(a) · W_o

    MLM head (BERT §3.1 "Masked LM", as in the released code):
        logits = LN_m(GELU(W_m h_L)) · W_wordᵀ + b_dec      decoder tied to the word embedding

The attention mask hides padded *keys* only: a padded position still computes an output
(attending to the real tokens) that no loss should use. `Bert(cfg)` with
`cfg.mlm_head=False` is the bare encoder (transformers' `BertModel`): forward returns the
last hidden states h_L; `cfg.pooler=True` adds BERT's pooler, tanh(W_p h_L[:, 0] + b_p),
the [CLS] summary used for sentence-level tasks (§3.2), available as `Bert.pool(h)`.

The GELU is the exact one, x·Φ(x) with the Gaussian CDF (Hendrycks & Gimpel 2016, eq. 1),
as BERT's released code; GPT-2 uses the tanh approximation instead.

Initialization (BERT's released code, `initializer_range` = 0.02): N(0, 0.02) for every
weight and embedding, zero biases, LayerNorm gains one. Unlike GPT-2 there is no 1/sqrt(2L)
scaling of the residual projections: post-LN renormalizes the stream after every add, so
its variance does not grow with depth.

Backends (`BertConfig.backend`, one setting for the whole model): attention and the
LayerNorms call the ops of ltk/kernels/ (`torch` = PyTorch's own implementations, `triton` =
our fused kernels, `auto` = triton on CUDA). Each post-LN add is fused into its LayerNorm:
`LN(x + delta)` is one call, `ln(delta, x)`, whose normalized output we keep.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ltk.kernels.attention import attention
from ltk.kernels.backend import BACKENDS, resolve_backend
from ltk.models.init import draw_init_seed, init_parameters, param_generator
from ltk.models.lm_head import check_loss, head_loss
from ltk.models.norms import LayerNorm
from ltk.models.param_groups import decay_groups
from ltk.models.pretrained import Pretrained


@dataclass
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary of bert-base-uncased; 0 = take it from the data
    block_size: int = 512  # longest sequence (number of learned positions)
    type_vocab_size: int = 2  # token types (segment A / B, BERT §3 "Input/Output Representations")
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072  # feed-forward width (4·d in the paper)
    dropout: float = 0.0  # on embeddings, attention probabilities and sublayer outputs (BERT used 0.1)
    norm_eps: float = 1e-12  # LayerNorm epsilon of the released checkpoints
    mlm_head: bool = True  # False: the bare encoder, forward returns the last hidden states
    pooler: bool = False  # BERT's [CLS] pooler (dense + tanh), as in transformers' BertModel
    backend: str = "auto"  # kernels for attention and LayerNorm: auto | torch | triton
    loss: str = "auto"  # the LM head\'s loss: auto | full (logits built) | fused (ltk/models/lm_head.py)

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "type_vocab_size", "n_layer", "n_head", "n_embd",
                     "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")
        check_loss(self.loss)


# name -> (n_layer, n_head, n_embd, intermediate_size); the sizes of BERT §3 (BASE and LARGE)
BERT_SIZES = {
    "bert-debug": (2, 4, 128, 512),
    "bert-base": (12, 12, 768, 3072),
    "bert-large": (24, 16, 1024, 4096),
}


def bert_config(name: str, **overrides) -> BertConfig:
    if name not in BERT_SIZES:
        raise ValueError(f"unknown BERT size {name!r}; known: {sorted(BERT_SIZES)}")
    n_layer, n_head, n_embd, inter = BERT_SIZES[name]
    base = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, intermediate_size=inter)
    if name == "bert-debug":
        base.update(block_size=128, vocab_size=0)
    base.update(overrides)
    return BertConfig(**base)


def num_params(cfg: BertConfig) -> int:
    """Exact parameter count (the tied decoder counted once, its bias counted).
    bert-base with the MLM head: 109,514,298 (transformers' BertForMaskedLM); bare with the
    pooler: 109,482,240 (BertModel)."""
    d, V, T, L, I = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.intermediate_size
    ln = 2 * d
    embeddings = V * d + T * d + cfg.type_vocab_size * d + ln
    attn = d * 3 * d + 3 * d + d * d + d
    ffn = d * I + I + I * d + d
    total = embeddings + L * (attn + ffn + 2 * ln)
    if cfg.mlm_head:
        total += d * d + d + ln + V  # transform dense, its LayerNorm, decoder bias
    if cfg.pooler:
        total += d * d + d
    return total


def flops_per_token(cfg: BertConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·d·T (PaLM, Chowdhery et al.
    2022, appendix B), N without the position and token-type tables (lookups, not matmuls).
    Attention is bidirectional, so the full T x T score matrix is really computed."""
    T = seq_len or cfg.block_size
    n = num_params(cfg) - (cfg.block_size + cfg.type_vocab_size) * cfg.n_embd
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * T


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.backend = cfg.backend
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        p_drop = self.dropout if self.training else 0.0
        if p_drop > 0:  # dropout on the attention probabilities: only PyTorch's kernel has it
            if resolve_backend(self.backend, x) == "triton":
                raise ValueError("the triton attention kernel has no attention dropout: "
                                 "train with --model.dropout 0 or --model.backend torch")
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        else:
            y = attention(q, k, v, causal=False, key_padding_mask=key_padding_mask,
                          backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact GELU, x·Φ(x) (Hendrycks & Gimpel 2016, eq. 1), as BERT's released code
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Layer(nn.Module):
    """One post-LN encoder layer: h = LN_1(x + Attn(x)); out = LN_2(h + FFN(h))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = LayerNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)
        self.ffn = FeedForward(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.ln_1(self.attn(x, key_padding_mask), x)[0]  # LN(x + Attn(x)), add fused
        return self.ln_2(self.ffn(h), h)[0]  # LN(h + FFN(h))


class MLMHead(nn.Module):
    """logits = LN(GELU(W h + b)) · W_wordᵀ + b_dec; the decoder matrix is passed in (tied)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln = LayerNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder's own bias
        self.loss, self.backend = cfg.loss, cfg.backend

    def forward(self, h: torch.Tensor, word_embedding: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, V); with targets (B, T) (-100 where not scored), the mean MLM loss."""
        z = self.ln(F.gelu(self.dense(h)))  # (B, T, C)
        if targets is None:
            return F.linear(z, word_embedding, self.bias)  # (B, T, V)
        return head_loss(z, word_embedding, targets, self.bias, loss=self.loss, backend=self.backend)


class Bert(Pretrained, nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        cfg.validate()
        self.init_seed = draw_init_seed()  # before any submodule: the same whether built whole or on meta
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # word (token) embeddings
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned absolute positions
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)  # token types (segments)
        self.ln_emb = LayerNorm(cfg.n_embd, eps=cfg.norm_eps, backend=cfg.backend)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.head = MLMHead(cfg) if cfg.mlm_head else None
        self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd) if cfg.pooler else None
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_parameters(self, self.init_parameter)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        """Fill t as parameter `name` starts: Linear and Embedding weights N(0, 0.02²) (Devlin et al.
        2019, as BERT's TF code), LayerNorm gains 1, every bias 0 (the MLM head's too). A function
        of (init_seed, name) alone (ltk/models/init.py)."""
        owner = self.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith("bias"):
            t.zero_()
        elif isinstance(owner, LayerNorm):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=param_generator(self.init_seed, name, t.device))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, *, targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T), 1 for a real token and 0 for padding (as
        transformers); token_type_ids (B, T), default all 0. Returns the MLM logits
        (B, T, vocab_size), or the last hidden states (B, T, n_embd) without the head; with targets
        (B, T) (-100 where not scored), the mean MLM loss (ltk/models/lm_head.py)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {tuple(t.shape)}")
        key_padding_mask = None if attention_mask is None else attention_mask.bool()  # (B, S), True = attend
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos) + self.wtt(token_type_ids)  # (B, T, C)
        x = self.drop(self.ln_emb(x))
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        if self.head is None:
            if targets is not None:
                raise ValueError("targets need the MLM head: this model is the bare encoder (mlm_head=False)")
            return x  # (B, T, C)
        return self.head(x, self.wte.weight, targets)  # (B, T, V), or the loss with targets

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(W_p h[:, 0] + b_p), the [CLS] state (B, C) for sentence tasks."""
        if self.pooler is None:
            raise ValueError("this model has no pooler: build it with BertConfig(pooler=True)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices (2-D weights, embeddings included), not biases
        or LayerNorm gains, which have no scale to regularize (BERT's optimizer also
        excluded biases and LayerNorm from weight decay)."""
        return decay_groups(self, weight_decay)
