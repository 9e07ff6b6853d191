"""The yardstick every strategy is measured against: the same model trained by one process.

A parallel run is correct when, fed the same global batches, it produces the same per-step
losses and the same final parameters as `train_single` (fp32, within 1e-5 relative). The
pieces here are shared by the tests, the labs and the benchmarks of ltk/parallel/ so that they all
compare against one definition:

    tiny_gpt(...)            a small GPT (dropout off: the comparison must be deterministic)
    synthetic_batches(...)   fixed random token batches, the *global* batch of every step
    dp_shard(x, r, n)        the rows of a global batch that data-parallel rank r trains on
    train_single(...)        AdamW over the batches in one process; losses + final parameters
    train_single_mixed(...)  the same in bf16 mixed precision, as N data-parallel ranks compute it

Loss averaging: every data-parallel rank computes the mean loss over its rows; gradients are
averaged over ranks (all-reduce / N), which equals the gradient of the mean over the global
batch when every rank has the same number of rows.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ltk.models.gpt import GPT, GPTConfig


def tiny_gpt_config(**overrides) -> GPTConfig:
    cfg = dict(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, backend="torch")
    cfg.update(overrides)
    return GPTConfig(**cfg)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_gpt_config(**overrides))


def synthetic_batches(steps: int, global_batch: int, seq_len: int, vocab: int, seed: int = 1234
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` (x, y) pairs of shape (global_batch, seq_len); y is x shifted by one token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def dp_shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's contiguous block of rows of a global batch (rows must divide evenly)."""
    if x.shape[0] % world:
        raise ValueError(f"global batch of {x.shape[0]} rows does not split over {world} data-parallel ranks")
    rows = x.shape[0] // world
    return x[rank * rows:(rank + 1) * rows]


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def make_optimizer(params, lr: float = 1e-2) -> torch.optim.Optimizer:
    """AdamW as every strategy's test uses it (no weight-decay groups: keeps sharding simple)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)


def train_single(model: torch.nn.Module, batches, lr: float = 1e-2, micro_batches: int = 1,
                 grad_clip: float = 0.0, loss_fn: Callable = lm_loss,
                 dp: int = 1) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, fp32: per-step mean losses and the final parameters (by name).

    dp > 1 forms each micro-batch's gradient as dp data-parallel ranks do — the mean over each
    rank's rows (dp_shard), summed in rank order, divided by dp — the same mathematics in the
    ranks' summation order. It matters where Adam meets a near-cancelling gradient element: at
    4 ranks with clipping, plain one-process training differs from this by 1.01e-5 relative,
    the floor of the split itself, not of any engine."""
    opt = make_optimizer(model.parameters(), lr)
    params = list(model.parameters())
    losses = []
    for x, y in batches:
        total, acc = 0.0, [None] * len(params)  # dp > 1: the step's gradient, micro-batch by micro-batch
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            summed = [None] * len(params)
            for r in range(dp):
                rows = (xm, ym) if dp == 1 else (dp_shard(xm, r, dp), dp_shard(ym, r, dp))
                loss = loss_fn(model, *rows) / micro_batches
                loss.backward()
                total += loss.item() / dp
                if dp > 1:  # this rank's gradient, added in rank order
                    for i, p in enumerate(params):
                        if p.grad is not None:
                            summed[i] = p.grad if summed[i] is None else summed[i] + p.grad
                            p.grad = None
            for i, g in enumerate(summed):
                if g is not None:
                    acc[i] = g / dp if acc[i] is None else acc[i] + g / dp
        if dp > 1:
            for p, g in zip(params, acc):
                p.grad = g
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_single_mixed(model: torch.nn.Module, batches, lr: float = 1e-2, dp: int = 1, grad_clip: float = 0.0,
                       reduce_dtype: torch.dtype = torch.bfloat16) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, bf16 mixed precision (ltk/parallel/mixed.py): bf16 parameters, fp32 masters
    updated by AdamW, the clip norm on fp32 gradients. A 16-bit gradient depends on which rows
    it was summed over, so the gradient is formed as `dp` data-parallel ranks form it: each
    rank's rows (dp_shard) give a bf16 gradient, those are summed in rank order in reduce_dtype
    and divided by dp (the collective's arithmetic at dp = 2, where the sum has one rounding).
    Returns per-step mean losses and the final fp32 masters by name."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    masters = [p.detach().clone().float() for p in params]
    opt = make_optimizer(masters, lr)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    losses = []
    for x, y in batches:
        total, summed = 0.0, [None] * len(params)
        for r in range(dp):
            loss = lm_loss(model, dp_shard(x, r, dp), dp_shard(y, r, dp))
            loss.backward()
            total += loss.item() / dp
            for i, p in enumerate(params):
                g = p.grad.to(reduce_dtype)
                summed[i] = g if summed[i] is None else summed[i] + g
                p.grad = None
        for m, g in zip(masters, summed):
            m.grad = g.float() / dp
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(masters, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
        losses.append(total)
    return losses, {n: m.clone() for n, m in zip(names, masters)}


def max_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of |a - b|_max / max(|b|_max, 1e-12); names must match."""
    if a.keys() != b.keys():
        raise ValueError(f"parameter names differ: {sorted(a.keys() ^ b.keys())}")
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)
