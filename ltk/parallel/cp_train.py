"""Context parallelism in the training loop (`ltk train --parallel.cp K`): each sequence of a
micro-batch split over the K ranks of a CP group, composed with data and tensor parallelism on
one mesh (ltk/parallel/dist.py: pp x dp x cp x tp, tp innermost).

    data        every rank reads the same global micro-batch, takes its dp rows (strategy.py),
                then its sequence shard of x and y (context_parallel.shard_sequence in the
                layout: zig-zag or contiguous), padded to 2K chunks; padded targets are -100
    positions   the model's attention modules and position code read one attribute,
                `context_parallel` (a ContextParallel, set by `attach`): GPT looks its learned
                positions up at the shard's global positions, Llama rotates q, k by them (RoPE);
                attention becomes ring or Ulysses attention over the CP group (on the local heads
                under tensor parallelism: heads are split by tp first); every other layer acts
                per position and is unchanged
    loss        each rank scores its shard (below)
    gradients   the parameters are replicated over cp, so cp ranks are data-parallel ranks for
                the gradient: the engine reduces over the flattened dp x cp group ("dp_cp":
                DDP's all-reduce, ZeRO-1/2/3's and FSDP2's shards, as torchtitan's dp_shard_cp)

Loss normalization. One process minimizes the mean cross-entropy of a micro-batch, L = Σ CE / N
over its N target tokens. With dp replicas d, each holding N_d tokens of its rows, and cp ranks
c splitting them (n_dc tokens, Σ_c n_dc = N_d), rank (d, c) returns

    L_dc = K · Σ_{its tokens} CE / N_d          ( = K · n_dc / N_d · mean CE of its tokens )

The backward of ring / Ulysses attention sends each rank's contribution to the other ranks'
K and V home, so the local gradients of a cp group add up to ∇ Σ_c L_dc = K ∇ L_d. Every engine
*averages* over the D·K ranks of dp_cp: (1/DK) Σ_d K ∇ L_d = (1/D) Σ_d ∇ L_d — the gradient of
one process (equal N_d, as without cp). The factor K undoes the engine's extra 1/K; the split
by N_d (not by each rank's own count) weighs every token alike whatever its shard holds, and
keeps a shard of padding only (no real token) harmless. The loss the loop logs is the world mean
of L_dc: (1/DK) Σ_d Σ_c L_dc = (1/D) Σ_d L_d, the single-process value.

Evaluation runs the same shards: each rank sums the nats and tokens of its real positions and
the sums are added over dp and cp (sharded_eval.sum_over).

Not supported (config_check_cp.py refuses them by name): packed rows (segment ids), the masked-LM
and span-corruption objectives (BERT, T5), instruction tuning, attention dropout, torch.compile,
sequence parallelism, DeepSpeed and torch-tp engines, pipeline parallelism.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltk.parallel.context_parallel import ContextParallel

IGNORE = -100  # the targets the loss skips: the padding of a shard (lm_head.py's ignore_index)


def attach(model: nn.Module, cp: ContextParallel | None) -> None:
    """Set `context_parallel` on every module that reads it (the model, for its positions; its
    attention modules); None turns context parallelism off."""
    found = 0
    for mod in model.modules():
        if hasattr(mod, "context_parallel"):
            mod.context_parallel = cp
            found += 1
    if found == 0 and cp is not None:
        raise ValueError(f"{type(model).__name__} has no context-parallel attention: GPT and Llama have one")


def shard_batch(cp: ContextParallel, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of (B, T) tokens and targets: (B, 2c) each, targets padded with IGNORE.
    Sets cp.seq_len = T (the model's positions and the attention's padding read it)."""
    cp.seq_len = x.shape[1]
    return cp.shard(x, dim=1), cp.shard(y, dim=1, pad_value=IGNORE)


def cp_loss(cp: ContextParallel, mean_loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_dc = K · Σ CE over this rank's tokens / N_d (module docstring). `mean_loss(x, y)` is the
    mean CE over the targets that are not IGNORE of the shard (the model's own loss)."""
    total = int((y != IGNORE).sum())  # N_d: this replica's target tokens, before the split
    xs, ys = shard_batch(cp, x, y)
    mine = int((ys != IGNORE).sum())
    if mine == 0:  # only padding here: the forward still runs (its collectives), its loss is 0
        return mean_loss(xs, ys.clamp(min=0)) * 0.0
    return mean_loss(xs, ys) * (cp.size * mine / max(total, 1))


def tp_mean_loss(model: nn.Module):
    """mean_loss for a tensor-parallel model: the vocab-parallel cross-entropy (tp_plan.tp_loss),
    which has no ignore index, masked to the targets that are not IGNORE."""
    from ltk.parallel.tensor import vocab_parallel_cross_entropy
    from ltk.parallel.tp_plan import _head

    def mean_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = _head(model)
        logits = model(x)[..., :head.n_valid]  # (B, 2c, V_r): padded vocabulary columns sliced off
        keep = (y != IGNORE).flatten()
        nats = vocab_parallel_cross_entropy(logits.flatten(0, 1), y.clamp(min=0).flatten(), head.vocab_start,
                                            model.tp_comm)  # (B·2c,)
        return (nats * keep).sum() / keep.sum().clamp(min=1)

    return mean_loss


def eval_sums(cp: ContextParallel, tp: bool):
    """objective.eval_sums of the causal LM on this rank's shard: [Σ nats, #targets, Σ nats over
    targets that stand for bytes, Σ bytes] of its real positions (add them over dp and cp)."""
    from ltk.parallel.sharded_eval import quiet

    def sums(model, x, y, gen, token_bytes) -> torch.Tensor:
        xs, ys = shard_batch(cp, x, y)
        keep = (ys != IGNORE).flatten()
        yk = ys.clamp(min=0).flatten()
        logits = model(xs)  # (B, 2c, V) or this rank's vocabulary slice under tp
        if tp:
            from ltk.parallel.tensor import vocab_parallel_cross_entropy
            from ltk.parallel.tp_plan import _head

            head = _head(model)
            nats = vocab_parallel_cross_entropy(logits[..., :head.n_valid].flatten(0, 1), yk, head.vocab_start,
                                                quiet(model.tp_comm)).float()
        else:
            nats = F.cross_entropy(logits.float().flatten(0, 1), yk, reduction="none")
        nats = nats * keep
        nbytes = token_bytes[yk] * keep
        return torch.stack([nats.sum().double(), keep.sum().double(), nats[nbytes > 0].sum().double(),
                            nbytes.sum().double()])

    return sums
