"""Pipeline parallelism for models.gpt.GPT: the model cut into stages by layers, and one
executor that runs any schedule of ltk/parallel/schedules.py with counted p2p messages.

Stages. S = p·v stages, stage s on rank s mod p (chunk s // p); the L blocks are split evenly,
stage s holding blocks [s·L/S, (s+1)·L/S). Stage 0 also holds the embeddings (wte, wpe), the
last stage ln_f, the head and the loss:

    stage 0:     h_0 = W_te[x] + W_pe[0..T);  blocks          -> residual stream (b, T, d)
    stage s:     blocks                                        -> residual stream (b, T, d)
    stage S-1:   blocks; logits = LN_f(h) W_headᵀ; loss = CE / m

The boundary. GPT's blocks hand on a pair (x, delta) whose sum is the residual stream (the
next LayerNorm fuses the add, ltk/models/gpt.py Block.forward). A stage sends the sum x + delta:
half the bytes of the pair, and the same numbers — the receiving block's ln_1 would have
computed exactly that add (ltk/kernels/layernorm.py: h = x + residual), and the gradient of the
sum is the gradient both x and delta would have received.

The tied embedding. GPT ties W_head = W_te (Press & Wolf 2017). When stage 0 and stage S-1
live on different ranks, the last stage keeps its own copy, initialised equal, and after the
backward of a step the first and last rank all-reduce (sum) their gradients of it, so both
hold dL/dW_te + dL/dW_head — the gradient of the tied parameter — and identical optimizer
steps keep the copies equal. This is Megatron-LM's "embedding group" (the pipeline code of
Narayanan et al. 2021): one all-reduce of V·d elements per step between two ranks, counted
apart from the boundary traffic in parallel.cost.pp_comm_bytes.

The executor. For each action of the rank's list, in order:

    F(i, c): input = micro-batch i of the tokens (stage 0) or recv(activation) from stage s-1;
             output = stage(input); stage S-1: loss_i = CE(output, y_i) / m; else send output
    B(i, c): stage S-1: backward(loss_i); else backward(output, recv(gradient) from s+1);
             stage s > 0: send d(loss)/d(input) to stage s-1

Receives block; sends are asynchronous (isend) and awaited at the end of the step. Dividing
each micro-batch loss by m makes the accumulated gradient the gradient of the full-batch mean,
as parallel.reference.train_single computes. Activations and gradients travel on two process
groups (two FIFO channels per rank pair, matched in order, which schedules.validate checks),
so a gradient can never be taken for an activation. Per-rank timings (forward, backward,
waiting for a receive, the rest) give the measured bubble to set beside pipeline_sim's.

Activation checkpointing (the model's `activation_checkpointing` flag, as GPT.forward reads it):
each block of a stage is run under torch.utils.checkpoint, keeping only its input; the block is
recomputed inside the stage's backward, B(i, c), so a stage holds one tensor per block per
micro-batch in flight instead of all its activations. Gradients are unchanged (bitwise: the
recomputation repeats the same operations).

Numerics. Every schedule here runs a chunk's backwards in micro-batch order 0..m-1, so each
block's gradient is bitwise the one-process gradient; only the tied weight's is summed in
another order (Σ_i e_i + Σ_i h_i, embedding and head parts, instead of Σ_i (e_i + h_i)).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ltk.models.gpt import GPT
from ltk.models.init import make_real
from ltk.parallel.dist import Comm
from ltk.parallel.fsdp2 import local
from ltk.parallel.pipeline_sim import simulate
from ltk.parallel.reference import make_optimizer
from ltk.parallel.schedules import Schedule, validate


def layer_ranges(n_layer: int, num_stages: int) -> list[range]:
    """The blocks of each stage: an even split, earlier stages one fewer when uneven."""
    if n_layer < num_stages:
        raise ValueError(f"a GPT with {n_layer} blocks cannot fill {num_stages} pipeline stages "
                         "(each stage needs one block at least)")
    return [range(s * n_layer // num_stages, (s + 1) * n_layer // num_stages) for s in range(num_stages)]


class GPTStage(nn.Module):
    """One stage of a GPT; parameter names are the full model's (h.5.attn..., lm_head.weight)."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.activation_checkpointing = getattr(model, "activation_checkpointing", False)
        if first:
            self.wte, self.wpe, self.drop = (copy.deepcopy(m) for m in (model.wte, model.wpe, model.drop))
        self.h = nn.ModuleDict({str(i): copy.deepcopy(model.h[i]) for i in layers})
        if last:
            self.ln_f = copy.deepcopy(model.ln_f)
            self.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
            with torch.no_grad():  # the tied weight: a copy on this stage, or the same tensor
                self.lm_head.weight = self.wte.weight if first else nn.Parameter(model.wte.weight.detach().clone())

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.first:  # inp: (b, T) token ids
            pos = torch.arange(inp.shape[1], device=inp.device)
            x = self.drop(self.wte(inp) + self.wpe(pos))  # (b, T, d)
        else:  # inp: (b, T, d) residual stream
            x = inp
        delta = None
        for block in self.h.values():
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = x if delta is None else x + delta  # as GPT.forward: one tensor kept per block
                x, delta = checkpoint(block, x, None, use_reentrant=False)
            else:
                x, delta = block(x, delta)
        if self.last:
            y = self.ln_f(x) if delta is None else self.ln_f(x, delta)[0]
            return self.lm_head(y)  # (b, T, V)
        return x if delta is None else x + delta  # the residual stream, one tensor


def split_gpt(model: GPT, num_stages: int) -> list[GPTStage]:
    """All S stages of `model` (copies; the model itself is left unchanged)."""
    ranges = layer_ranges(model.config.n_layer, num_stages)
    return [GPTStage(model, r, s == 0, s == num_stages - 1) for s, r in enumerate(ranges)]


def rank_stages(model: GPT, rank: int, stages: int, virtual: int = 1,
                device: torch.device | str | None = None) -> list[GPTStage]:
    """The v chunks rank `rank` holds: model stages c·p + rank for c = 0..v-1 (round robin).
    A model built with its parameters on the meta device (ltk/models/init.py) is never made
    whole: each chunk's own parameters are initialized here, one at a time, on `device`."""
    S = stages * virtual
    ranges = layer_ranges(model.config.n_layer, S)
    chunks = [GPTStage(model, ranges[c * stages + rank], c * stages + rank == 0, c * stages + rank == S - 1)
              for c in range(virtual)]
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if p.is_meta:  # a stage's names are the full model's; the last stage's head starts as W_te
                t = torch.empty(p.shape, dtype=p.dtype)
                model.init_parameter("wte.weight" if name == "lm_head.weight" else name, t)
                make_real(p, t.to(device or "cpu"))
    return chunks


@dataclass
class PipelineComms:
    """The pipeline's groups: activations and gradients on separate FIFO channels, and the
    embedding group {first, last rank} for the tied weight (None when p = 1)."""

    act: Comm
    grad: Comm
    embed: Comm | None

    @classmethod
    def build(cls, ranks: list[int] | None = None) -> "PipelineComms":
        """Collective: every process of the world calls it. `ranks`: the pipeline's global
        ranks in stage order (default: the whole world)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        ranks = list(range(world)) if ranks is None else list(ranks)
        if world == 1:
            return cls(Comm(), Comm(), None)
        act, grad = Comm(dist.new_group(ranks)), Comm(dist.new_group(ranks))
        emb = dist.new_group([ranks[0], ranks[-1]]) if len(ranks) > 1 else None
        return cls(act, grad, Comm(emb) if emb is not None and dist.get_rank() in (ranks[0], ranks[-1]) else None)


@dataclass
class StepTimings:
    """Seconds one rank spent in one step."""

    forward: float = 0.0  # stage forwards (and the loss)
    backward: float = 0.0
    wait: float = 0.0  # blocked in a receive: the bubble, plus transfer time
    other: float = 0.0  # awaiting sends, the tied all-reduce, the optimizer

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.wait + self.other

    @property
    def bubble(self) -> float:
        """Measured idle / compute, comparable with pipeline_sim.SimResult.bubble_per_rank."""
        return self.wait / max(self.forward + self.backward, 1e-12)


def simulated_bubble(schedule: Schedule, timings: list[StepTimings], p2p_latency: float = 0.0) -> list[float]:
    """The bubble per rank that pipeline_sim predicts for the compute times the ranks measured
    in one step (timings[r] from rank r): each of rank r's v chunks takes forward_r / (m·v) and
    backward_r / (m·v). Put beside StepTimings.bubble, the gap is communication and noise."""
    if len(timings) != schedule.stages:
        raise ValueError(f"{len(timings)} timings for {schedule.stages} ranks")
    n = schedule.micro_batches * schedule.virtual
    stages = range(schedule.num_model_stages)
    tf = [timings[s % schedule.stages].forward / n for s in stages]  # stage s runs on rank s mod p
    tb = [timings[s % schedule.stages].backward / n for s in stages]
    return simulate(schedule, tf, tb, p2p_latency).bubble_per_rank


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


class PipelineTrainer:
    """One rank's share of a pipelined GPT: train_step = forward_backward (the schedule, the
    tied weight synced) + the optimizer step. ltk/parallel/pipeline_run.py composes forward_backward
    with data parallelism for the training loop."""

    def __init__(self, model: GPT, schedule: Schedule, comms: PipelineComms, lr: float = 1e-2,
                 optimizer: Callable[[list[GPTStage]], torch.optim.Optimizer] | None = None,
                 device: torch.device | str | None = None):
        """`optimizer(chunks)` builds the optimizer over this rank's chunks (default: AdamW of
        parallel.reference.make_optimizer over all their parameters, learning rate `lr`)."""
        validate(schedule)
        if comms.act.size != schedule.stages:
            raise ValueError(f"schedule has {schedule.stages} stages but the pipeline group has {comms.act.size} ranks")
        self.schedule, self.comms, self.rank = schedule, comms, comms.act.rank
        self.chunks = rank_stages(model, self.rank, schedule.stages, schedule.virtual, device)
        self.opt = (optimizer(self.chunks) if optimizer is not None
                    else make_optimizer([p for c in self.chunks for p in c.parameters()], lr))
        # the stages' dtype: bf16 once a mixed-precision optimizer has cast them (ltk/parallel/mixed.py)
        first = next(self.chunks[0].parameters())
        self.hidden, self.dtype, self.device = model.config.n_embd, first.dtype, first.device

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for c in self.chunks for n, p in c.named_parameters()}

    def _recv(self, src: tuple, kind: str, b: int, T: int, local: dict, tm: StepTimings) -> torch.Tensor:
        if src[0] == self.rank:  # same-rank hand-off (p = 1 with v > 1)
            return local.pop((kind,) + src)
        buf = torch.empty(b, T, self.hidden, dtype=self.dtype, device=self.device)  # (b, T, d)
        comm = self.comms.act if kind == "F" else self.comms.grad
        _, dt = _timed(lambda: comm.recv(buf, src[0]).wait())
        tm.wait += dt
        return buf

    def _send(self, t: torch.Tensor, kind: str, src_action, local: dict, pending: list) -> None:
        dst = self.schedule.consumer(self.rank, src_action)
        if dst[0] == self.rank:
            local[(kind, self.rank, src_action)] = t
        else:
            pending.append(((self.comms.act if kind == "F" else self.comms.grad).send(t, dst[0]), t))

    @property
    def holds_last_stage(self) -> bool:
        s = self.schedule
        return any(s.model_stage(self.rank, c) == s.num_model_stages - 1 for c in range(s.virtual))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, StepTimings]:
        """One optimizer step on the global batch (x, y) of shape (B, T). Returns the step's
        loss (the mean over the batch; on the rank holding the last stage, else None) and timings."""
        t0 = time.perf_counter()
        loss, tm = self.forward_backward(x, y)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        tm.other += time.perf_counter() - t0 - tm.total
        return loss, tm

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, StepTimings]:
        """The schedule on (x, y) of shape (B, T), gradients accumulated into the chunks' .grad
        (the tied weight's copies summed), no optimizer step. Returns the loss as train_step."""
        s, m = self.schedule, self.schedule.micro_batches
        if x.shape[0] % m:
            raise ValueError(f"global batch of {x.shape[0]} rows does not split into {m} equal micro-batches")
        xs, ys = x.chunk(m), y.chunk(m)  # m x (b, T)
        b, T = xs[0].shape
        tm, t_step = StepTimings(), time.perf_counter()
        saved: dict = {}  # (micro, chunk) -> (input, output or loss)
        local: dict = {}  # same-rank hand-offs
        pending: list = []  # (isend work, tensor kept alive until it completes)
        total = 0.0
        for a in s.actions[self.rank]:
            stage, mod = s.model_stage(self.rank, a.chunk), self.chunks[a.chunk]
            last = stage == s.num_model_stages - 1
            if a.kind == "F":
                if stage == 0:
                    inp = xs[a.micro]
                else:
                    inp = self._recv(s.producer(self.rank, a), "F", b, T, local, tm).requires_grad_()
                t0 = time.perf_counter()
                out = mod(inp)
                if last:  # loss_i / m: the summed gradients are those of the full-batch mean
                    out = F.cross_entropy(out.flatten(0, 1).float(), ys[a.micro].flatten()) / m
                    total += out.item()
                tm.forward += time.perf_counter() - t0
                saved[(a.micro, a.chunk)] = (inp, out)
                if not last:
                    self._send(out.detach(), "F", a, local, pending)
            else:
                inp, out = saved.pop((a.micro, a.chunk))
                grad = None if last else self._recv(s.producer(self.rank, a), "B", b, T, local, tm)
                _, dt = _timed(torch.autograd.backward, out, grad)
                tm.backward += dt
                if stage > 0:
                    self._send(inp.grad, "B", a, local, pending)
        for work, _ in pending:
            work.wait()
        self._sync_tied_embedding()
        tm.other = time.perf_counter() - t_step - tm.forward - tm.backward - tm.wait
        return (total if self.holds_last_stage else None), tm

    def _sync_tied_embedding(self) -> None:
        """Sum dL/dW_te (stage 0) and dL/dW_head (stage S-1) on both copies of the tied weight."""
        first, last = self.chunks[0], self.chunks[-1]
        if self.schedule.num_model_stages == 1:
            return  # one module: the weight is shared, autograd already summed
        if self.schedule.stages == 1:  # both stages on this rank, two copies
            g = first.wte.weight.grad + last.lm_head.weight.grad
            first.wte.weight.grad.copy_(g)
            last.lm_head.weight.grad.copy_(g)
        elif self.comms.embed is not None:
            w = first.wte.weight if first.first else last.lm_head.weight
            # under FSDP2 (torch_pp_fsdp.py) both copies are sharded alike over dp: sum the local shards
            self.comms.embed.all_reduce(local(w.grad))
