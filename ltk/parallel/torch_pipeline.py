"""torch.distributed.pipelining behind `--parallel torch-pp`: PyTorch's pipeline schedules run the
same stages as the lab's executor (ltk/parallel/pipeline.py), so the two are compared with
everything else equal — the cut (layer_ranges), the stages (GPTStage, full-model parameter
names), the tied embedding, data parallelism over replicas and checkpoints (pipeline_run.py).

    ours (pipeline.py)                  torch (this file)
    make_schedule(name, p, m, v)        ScheduleGPipe | Schedule1F1B | ScheduleInterleaved1F1B
    our isend/irecv of activations      PipelineStage: shapes agreed at the first step, P2P
                                        batched per action (batch_isend_irecv)
    loss_i / m, backward                loss_fn(logits_i, y_i), backward, then the stage's
                                        gradients scaled by 1/m (scale_grads=True): the same
                                        Σ_i ∂(ℓ_i / m)/∂p (Huang et al. 2019; Narayanan et al.
                                        2021 §2.2 for 1F1B and the interleaved schedule)

Stage k of S = p·v is held by rank k mod p (torch's loop placement, the same round robin as
`rank_stages`). After the schedule the tied embedding's two copies are summed as ours are.
torch's schedule runs forward, backward and waits inside one call, so the step's timings put
all of it under `forward` (its split is not observable from outside).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ltk.parallel.pipeline import PipelineTrainer, StepTimings

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one micro-batch: logits (b, T, V), y (b, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


class TorchPipelineTrainer(PipelineTrainer):
    """PipelineTrainer whose forward_backward runs torch.distributed.pipelining's schedule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        s = self.schedule
        kind = "interleaved" if s.name.startswith("interleaved") else s.name
        if kind not in SCHEDULES:
            raise ValueError(f"torch-pp runs the schedules {', '.join(SCHEDULES)}, not {s.name!r}")
        group = self.comms.act.group
        self.stages = [PipelineStage(c, s.model_stage(self.rank, i), s.num_model_stages, self.device, group=group)
                       for i, c in enumerate(self.chunks)]
        m = s.micro_batches
        if kind == "interleaved":
            self.torch_schedule = ScheduleInterleaved1F1B(self.stages, m, loss_fn=_lm_loss)
        else:
            cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
            self.torch_schedule = cls(self.stages[0], m, loss_fn=_lm_loss)
        self.has_first = any(st.is_first for st in self.stages)
        self.has_last = any(st.is_last for st in self.stages)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, StepTimings]:
        """torch's schedule on (x, y) of shape (B, T): x enters on the rank of the first stage,
        y on the rank of the last; gradients land in the chunks' .grad, the tied weight's copies
        summed. Returns the mean loss (on the rank holding the last stage, else None)."""
        m = self.schedule.micro_batches
        if x.shape[0] % m:
            raise ValueError(f"global batch of {x.shape[0]} rows does not split into {m} equal micro-batches")
        tm, t0 = StepTimings(), time.perf_counter()
        losses: list[torch.Tensor] = []
        args = (x.to(self.device),) if self.has_first else ()
        kwargs = {"target": y.to(self.device), "losses": losses} if self.has_last else {}
        self.torch_schedule.step(*args, **kwargs)
        tm.forward = time.perf_counter() - t0
        t1 = time.perf_counter()
        self._sync_tied_embedding()
        tm.other = time.perf_counter() - t1
        total = sum(loss.item() for loss in losses) / m if self.has_last else None
        return total, tm
