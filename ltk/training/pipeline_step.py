"""The training step under pipeline parallelism (Trainer.train_step's path for a PipelineRun).

The micro-batch loop of the other engines is the pipeline's schedule here: this rank's rows of
all grad_accum global micro-batches go through it at once as its m micro-batches, and the engine
returns the global mean loss, the same on every rank (ltk/parallel/pipeline_run.py, steps 1-3).
"""
from __future__ import annotations

import torch

from ltk.parallel.pipeline_run import PipelineRun
from ltk.training.loader import TokenLoader


def pipeline_step(par: PipelineRun, loader: TokenLoader, grad_accum: int, clip: float,
                  device: torch.device) -> tuple[float, float]:
    """One optimizer step: forward and backward by the schedule, clip, AdamW, zero grads.
    Returns (loss, grad norm); the caller counts the step and its tokens."""
    xs, ys = zip(*(loader.next_batch() for _ in range(grad_accum)))
    x = torch.cat([par.rows(b) for b in xs]).to(device)  # (grad_accum · B/dp, T)
    y = torch.cat([par.rows(b) for b in ys]).to(device)
    loss = par.forward_backward(x, y)  # the global mean, the same on every rank
    grad_norm = par.clip_grad_norm_(clip)
    par.step()
    par.zero_grad()
    return loss, grad_norm
