"""The training loop: data -> model -> loss -> gradients -> AdamW, with checkpoints that
resume exactly.

Launch lines (the `ltk train` entry point calls `Trainer(cfg).fit()`):

    # CPU, the debug model on the embedded corpus (about a minute)
    ltk train --preset gpt-debug --max-steps 300
    # one GPU: GPT-2 124M, bf16 autocast, torch.compile, 16 x 1024 tokens x 32 = 0.5M per step
    ltk train --preset gpt2-124m --device cuda --trainer.compile true --trainer.batch_size 16 --trainer.grad_accum 32
    # several processes (DDP, torch's engine): 4 GPUs on one node, or 2 CPU processes on gloo
    torchrun --standalone --nproc_per_node 4 -m ltk.cli train --preset gpt2-124m
    CUDA_VISIBLE_DEVICES= torchrun --standalone --nproc_per_node 2 -m ltk.cli train --preset gpt-debug
    # several nodes: the same command on each, restarts continuing from the newest checkpoint (docs/multi-node.md)
    ltk train --preset gpt2-124m --nproc 8 --nnodes 2 --node-rank R --rdzv-endpoint node0:29400 --resume auto \
        --max-restarts 3

One optimizer step (per rank):

    for each of grad_accum micro-batches:       loss_i = CE(model(x_i), y_i) / grad_accum
        backward(loss_i)                        grads accumulate: Σ_i ∇loss_i = ∇ mean loss
    clip the global gradient norm to grad_clip  (Pascanu et al. 2013, §3.2)
    lr <- schedule(step); AdamW step; zero grads

The task (cfg.task): pre-training, the family's objective on token windows (the data prepared
by ltk/training/data.py), or instruction tuning of a base model (ltk/training/instruct_run.py:
the loss on the response, exact match on the built-in task); the adapter (cfg.adapter,
ltk/training/adapters.py): every weight trains, or LoRA / QLoRA adapters on the frozen base.
`ltk finetune` is this loop with task.kind = "instruct" (ltk/training/finetune.py).

Exact resume: a checkpoint holds the weights (with an adapter: the adapters only, the frozen
base referenced by path and checksums), the optimizer moments, the step, the data-loader position
and every RNG state (ltk/training/trainer_state.py), so N steps + resume + N steps reproduces 2N
uninterrupted steps bit for bit on a CPU (tests/unit/test_trainer.py checks it). A resume that
could not be exact is refused (ltk/training/resume.py); Ctrl-C or SIGTERM stops at a step
boundary and saves there (ltk/training/stop.py); fit() holds the run folder, which never mixes
two runs (ltk/training/run_folder.py).

Here: the set-up's order, train_step and fit's loop. Beside: the model, objective and loaders by
task (trainer_setup.py), the pipeline's step (pipeline_step.py), what fit() measures and writes
(run_monitor.py: rows, summary.json, plots), checkpoints of a run (trainer_state.py).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ltk.models import get_family
from ltk.parallel.pipeline_run import PipelineRun
from ltk.parallel.strategy import ParallelRun
from ltk.training.adapters import checkpoint_names
from ltk.training.base_model import adopt_base
from ltk.training.checkpoint import Checkpoint
from ltk.training.config import RunConfig
from ltk.training.config_check import check_run
from ltk.training.data import prepare_data
from ltk.training.engine import build_engine
from ltk.training.evaluate import evaluate
from ltk.training.faults import Fault
from ltk.training.hardware import peak_flops
from ltk.training.init_from import InitSource, load_initial_weights
from ltk.training.instruct_setup import sharded_loaded
from ltk.training.loggers import Loggers, check_sinks, open_loggers
from ltk.training.memory_watch import mark_baseline
from ltk.training.objectives import step_generator
from ltk.training.optim import lr_at, set_lr
from ltk.training.packing import pad_rows
from ltk.training.pipeline_step import pipeline_step
from ltk.training.resume import check_resume
from ltk.training.run_folder import RunFolder, claim_for_ranks
from ltk.training.run_monitor import RunMonitor, announce, close_logs
from ltk.training.runtime import seed_everything, setup_runtime
from ltk.training.stop import StopOnSignal, TrainingStopped
from ltk.training.trainer_setup import setup_instruct, setup_pretrain
from ltk.training.trainer_state import load_run, save_run


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]  # the last logged metrics (loss, val_loss, val_bpb, tokens/s, ...)
    checkpoint: Path | None


class Trainer:
    """overwrite: a fresh run replaces the run out_dir holds; folder: out_dir as claimed by the caller
    (the CLI, before building anything), else fit() claims it (ltk/training/run_folder.py); auto:
    started by `--resume auto` (`resume` is what it found, or None: a fresh start in a folder that
    may hold the rows of an attempt that never saved); init_from: a fresh run's initial weights
    (continued pre-training, ltk/training/init_from.py; cfg already holds the source's model and
    tokenizer), ignored when a checkpoint is resumed."""
    def __init__(self, cfg: RunConfig, resume: Checkpoint | None = None, *, overwrite: bool = False,
                 folder: RunFolder | None = None, auto: bool = False, init_from: InitSource | None = None):
        mark_baseline()  # memory peaks count from here: what the caller held before is not this run's
        self.cfg, self.resume, self.overwrite, self.folder, self.auto = cfg, resume, overwrite, folder, auto
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.base = adopt_base(cfg)  # fine-tuning: the run takes the base's architecture (None: pre-training)
        check_run(cfg, world=world)  # every value, the layout and the size: before anything is allocated
        t = cfg.trainer
        if resume is not None:
            check_resume(cfg, resume.state, resume.path)
        self.sinks = check_sinks(t.log_to)  # an unknown sink or a missing package: an error before any work
        self.logger = Loggers()  # rank 0 opens the sinks in fit()
        self.rt = setup_runtime(t.device, t.dtype)
        self.run_dir = Path(t.out_dir)
        seed_everything(t.seed)
        self.family = get_family(cfg.family)
        m = cfg.model
        self.task, self.before, self.base_reader, self.base_load = None, None, None, None
        if self.base is not None:  # the model, objective, loaders (ltk/training/trainer_setup.py)
            setup_instruct(self)
        else:
            setup_pretrain(self, self._prepare_data())
        self.step, self.tokens_seen, self.last_step_tokens = 0, 0, 0
        self.par = build_engine(self.model, self.cfg, self.rt.device)  # ltk/training/engine.py
        self.optimizer = self.par.optimizer
        self.par.checkpoint_names = checkpoint_names(self.model, cfg.adapter)
        if self.base_reader is not None:  # the base is in the engine's shards: what loading held, the score before
            self.base_load, self.before = sharded_loaded(self.base_reader, self.par, self.task, self.objective,
                                                         self.rt, evaluate=resume is None)
        self.base_ref = self.base.reference() if self.base is not None and cfg.adapter.method != "none" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.rt.dtype == "fp16")
        self.init_from = None if resume is not None else init_from
        if resume is not None:
            load_run(self, resume)  # weights, optimizer, loader, step, RNG (ltk/training/trainer_state.py)
        elif init_from is not None:
            self._load_initial_weights(init_from)
        self.tokens_per_step = t.batch_size * self.seq_len * t.grad_accum  # global: the same at any world size
        self.flops_per_token = self.family.flops_per_token(m, self.seq_len)
        self.peak = peak_flops(self.rt.device, self.rt.dtype)  # None where the device's peak is unknown
        self.num_params = self.family.num_params(m)

    # -- set-up -------------------------------------------------------------------------
    def _load_initial_weights(self, src: InitSource) -> None:
        """The source's weights into what each rank holds; optimizer, step and data start fresh."""
        if self.rt.is_main:
            print(f"init: {src.describe()} (fresh optimizer, step 0)")
        load_initial_weights(self.par, src)

    def _prepare_data(self):
        # rank 0 builds the cached dataset; the others wait and then read it
        if self.rt.world_size > 1 and not self.rt.is_main:
            dist.barrier()
        data = prepare_data(self.cfg.data, verbose=self.rt.is_main)
        if self.rt.world_size > 1 and self.rt.is_main:
            dist.barrier()
        return data

    # -- one step -----------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm)."""
        # bf16: the engine's parameters are bf16 already, no autocast (ltk/training/runtime.py)
        t, autocast = self.cfg.trainer, (nullcontext if self.rt.dtype == "bf16" else self.rt.autocast())
        if isinstance(self.par, ParallelRun):
            self.par.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, t.max_steps))
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        if isinstance(self.par, PipelineRun):  # the schedule runs the micro-batches (ltk/training/pipeline_step.py)
            loss, grad_norm = pipeline_step(self.par, self.train_loader, t.grad_accum, clip, self.rt.device)
            self.step, self.last_step_tokens = self.step + 1, self.tokens_per_step
            self.tokens_seen += self.tokens_per_step
            return loss, grad_norm
        total = torch.zeros((), device=self.rt.device)
        engine = self.par.engine
        self.last_step_tokens = 0
        for micro in range(t.grad_accum):
            # the global micro-batch, (x, y) or packed instruction rows (x, y, segments); this rank's rows below
            x, y, *extra = self.train_loader.next_batch()
            self.last_step_tokens += self.task.loader.last_tokens if self.task else x.numel()
            responses = int((y != -100).sum()) if self.task is not None else 0  # of the global micro-batch
            if self.task is not None and len(extra) == 1 and x.shape[0] % self.par.dp_size:
                x, y, extra[0] = pad_rows(x, y, extra[0], self.par.dp_size)  # packed: as many rows as needed
            x, y, *extra = (self.par.rows(b).to(self.rt.device, non_blocking=True) for b in (x, y, *extra))
            # data parallel: reduce gradients only after the last micro-batch
            sync = engine.no_sync() if micro < t.grad_accum - 1 else nullcontext()
            gen = step_generator(t.seed, self.step, micro, self.par.dp_rank)  # masks/spans for this micro-batch
            with sync:
                with autocast():
                    loss = self.par.loss(self.objective, x, y, gen, *extra)
                if self.task is not None and self.par.dp_size > 1:
                    loss = self._global_token_mean(loss, y, responses)
                scaled = self.scaler.scale(loss / t.grad_accum)
                engine.backward(scaled) if hasattr(engine, "backward") else scaled.backward()  # DeepSpeed: its own
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.par.clip_grad_norm_(clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            engine.step()
        engine.zero_grad()
        if grad_norm is None:  # an engine that clips inside its step (DeepSpeed) knows the norm after it
            grad_norm = engine.grad_norm()
        self.step += 1
        self.tokens_seen += self.last_step_tokens
        # every tensor-parallel rank of a replica holds the same loss: the world mean is the dp mean
        loss = self.rt.all_reduce_sum(total / t.grad_accum) / self.rt.world_size
        return loss.item(), grad_norm

    def _global_token_mean(self, loss: torch.Tensor, y: torch.Tensor, responses: int) -> torch.Tensor:
        """Instruction tuning over dp ranks: one process takes the mean over the micro-batch's
        response tokens (k of them); a rank's mean over its own k_r is weighted by dp · k_r / k, so
        the engines' mean of the ranks' gradients, and of their losses, is that same mean. A rank
        whose rows hold no response token contributes 0 (its loss, a mean over none, is NaN)."""
        k_r = (y != -100).sum()
        return torch.where(k_r > 0, loss, 0.0) * (self.par.dp_size * k_r / max(responses, 1))

    def evaluate(self) -> dict[str, float]:
        """Validation on the model as the engine holds it: sharded models are never gathered
        whole (ltk/parallel/sharded_eval.py); each data-parallel replica scores a share. Instruction
        tuning: the response loss and, on the built-in task, exact match (ltk/training/instruct_run.py)."""
        if self.task is not None:
            return self.task.evaluate(self.par.eval_share(self.objective).model, self.rt.device, self.rt.autocast())
        batches = list(self.val_loader.eval_batches(self.cfg.trainer.eval_batches))
        share = self.par.eval_share(self.objective)
        mine = [batches[i] for i in share.mine(len(batches))]
        pad = [batches[0]] * (share.calls(len(batches)) - len(mine))  # lockstep: as many forward calls as any rank
        return evaluate(share.model, mine, self.token_bytes, self.rt.device, self.rt.autocast(),
                        share.all_reduce, objective=self.objective, seed=self.cfg.trainer.seed,
                        first_index=share.rank, index_step=share.size, eval_sums=share.eval_sums, discard=pad)

    def save(self) -> Path | None:
        """A checkpoint of this step: sharded on several processes, consolidated on one
        (ltk/training/trainer_state.py)."""
        return save_run(self)

    # -- the loop -----------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)  # metrics.jsonl and the sinks of trainer.log_to (ltk/training/loggers.py)

    def fit(self) -> TrainResult:
        """Train to trainer.max_steps, holding the run folder all along (claimed here unless given)."""
        folder = self.folder or claim_for_ranks(self.run_dir, self.rt, overwrite=self.overwrite,
                                                resume_from=self.resume.path if self.resume else None,
                                                auto=self.auto)
        try:
            return self._fit(folder)
        finally:
            if folder is not self.folder:
                folder.release()

    def _fit(self, folder: RunFolder) -> TrainResult:
        t = self.cfg.trainer
        if self.rt.is_main:
            announce(self, folder)  # config.json and the opening line (ltk/training/run_monitor.py)
        mon = RunMonitor(self)  # progress bar, throughput, memory, profile, timeline
        stop, stopping = StopOnSignal(self.rt, announce=self.rt.is_main), 0
        fault = Fault.from_env(self.rt.local_rank)  # LTK_FAULT: the restart tests' crash (ltk/training/faults.py)
        if self.rt.is_main:
            self.logger = open_loggers(self.sinks, self.run_dir, self.cfg.to_dict(), self.cfg.name)
        last: dict[str, Any] = {}
        ckpt = None
        try:
            mon.start()
            with mon.timeline, stop:
                while self.step < t.max_steps:
                    mon.timeline.begin_step(self.step)
                    t0 = time.perf_counter()
                    with mon.memory, mon.comm:
                        loss, grad_norm = self.train_step()
                    mon.step_done(time.perf_counter() - t0, self.last_step_tokens)
                    mon.timeline.end_step()
                    if fault:
                        fault.after_step(self.step)
                    stopping = stop.agreed()  # a signal: every rank saves after this same step and stops
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss became {loss} at step {self.step}; last checkpoint kept intact")
                    done = self.step == t.max_steps
                    do_eval = (t.eval_every > 0 and self.step % t.eval_every == 0) or done
                    if self.step % t.log_every == 0 or do_eval or self.step == 1:
                        last = mon.row(self, loss, grad_norm)  # tokens/s, MFU since the last row
                        if do_eval:
                            with mon.watch.phase("eval"):
                                last.update(self.evaluate())
                        self._log(last)
                        mon.logged(last)  # collective: every rank logs at the same steps
                    mon.bar.update(1)
                    if (t.ckpt_every > 0 and self.step % t.ckpt_every == 0) or done or stopping:
                        with mon.watch.phase("save"):
                            ckpt = self.save()
                    mon.profile.step()
                    if stopping:
                        break
                mon.timeline.flush()
                mon.timeline.write(self.run_dir)  # rank 0: timeline.json, timeline.png
        except KeyboardInterrupt:  # a second signal: the last checkpoint saved stays the one to resume
            if self.rt.is_main:
                print(f"\nstopped at once in step {self.step + 1}, nothing saved: the last checkpoint stays intact")
            raise
        finally:
            mon.close()
            close_logs(self.logger, self.run_dir, self.rt.is_main)  # and loss.png
        mon.finish(self, last, ckpt)  # collective: every rank's memory peaks; rank 0 writes summary.json
        if stopping and self.step < t.max_steps:
            raise TrainingStopped(stopping, self.step, ckpt)
        return TrainResult(self.run_dir, self.step, last, ckpt)
