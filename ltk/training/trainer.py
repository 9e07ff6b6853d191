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
base referenced by path and checksums, ltk/training/base_model.py), the optimizer moments, the
step, the data-loader position and every RNG state, so N steps + resume + N steps reproduces 2N
uninterrupted steps bit for bit on a CPU (tests/unit/test_trainer.py checks it). A resume that
could not be exact is refused (ltk/training/resume.py); Ctrl-C or SIGTERM stops at a step
boundary and saves there (ltk/training/stop.py); fit() holds the run folder, which never mixes
two runs (ltk/training/run_folder.py).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ltk.models import get_family
from ltk.models.init import build_on_meta, move_buffers
from ltk.models.qlora import memory_breakdown
from ltk.parallel.pipeline_run import PipelineRun
from ltk.parallel.strategy import ParallelRun
from ltk.parallel.timeline import Timeline
from ltk.training.adapters import checkpoint_names
from ltk.training.base_model import adopt_base, check_reference
from ltk.training.base_stream import BaseReader
from ltk.training.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from ltk.training.config import RunConfig
from ltk.training.config_check import check_run
from ltk.training.data import prepare_data
from ltk.training.engine import build_engine
from ltk.training.evaluate import evaluate
from ltk.training.faults import Fault
from ltk.training.hardware import peak_flops
from ltk.training.init_from import InitSource, load_initial_weights
from ltk.training.instruct_run import InstructTask
from ltk.training.instruct_setup import adapted_on_meta, sharded_loaded, sharded_setup, whole_base
from ltk.training.loader import TokenLoader
from ltk.training.loggers import Loggers, check_sinks, open_loggers
from ltk.training.memory import MemoryProbe
from ltk.training.memory_report import memory_report
from ltk.training.memory_watch import MemoryWatch, mark_baseline
from ltk.training.objectives import Instruct, objective_for, step_generator
from ltk.training.optim import lr_at, set_lr
from ltk.training.packing import pad_rows
from ltk.training.profiling import RunProfile
from ltk.training.progress import progress_enabled
from ltk.training.reshard import load_local_state
from ltk.training.resume import check_resume
from ltk.training.run_folder import RunFolder, claim_for_ranks
from ltk.training.run_plot import plot_at_end, plot_run
from ltk.training.runtime import capture_host_rng, capture_rng, restore_rng, seed_everything, setup_runtime
from ltk.training.sharded_checkpoint import open_reader, save_sharded
from ltk.training.stop import StopOnSignal, TrainingStopped


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
        if self.base is not None:
            self._setup_instruct()
        else:
            self._setup_pretrain()
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
            self._load(resume)
        elif init_from is not None:
            self._load_initial_weights(init_from)
        self.tokens_per_step = t.batch_size * self.seq_len * t.grad_accum  # global: the same at any world size
        self.flops_per_token = self.family.flops_per_token(m, self.seq_len)
        self.peak = peak_flops(self.rt.device, self.rt.dtype)  # None where the device's peak is unknown
        self.num_params = self.family.num_params(m)

    # -- set-up -------------------------------------------------------------------------
    def _setup_pretrain(self) -> None:
        t, m = self.cfg.trainer, self.cfg.model
        self.data = self._prepare_data()
        self.tokenizer_file = self.data.path / "tokenizer.json"
        self.objective = objective_for(self.cfg.family, self.data.vocab_size, self.data.eot_id)
        need = self.data.vocab_size + self.objective.extra_tokens  # + [MASK] / sentinels
        if m.vocab_size == 0:
            m.vocab_size = need
        elif need > m.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.data.vocab_size} tokens (+{self.objective.extra_tokens} for the "
                f"{self.objective.name} objective) but model.vocab_size is {m.vocab_size}; "
                f"set --model.vocab_size {need} or lower --data.vocab_size"
            )
        self.seq_len = t.seq_len or m.block_size  # check_run: T5 (no block_size) names its seq_len

        self.model = self._build_model()
        self.model.activation_checkpointing = t.activation_checkpointing
        # every rank reads the same global batch and trains on its rows (ltk/parallel/strategy.py)
        self.train_loader = TokenLoader(self.data.train_files, self.seq_len, t.batch_size, seed=t.seed)
        self.val_loader = TokenLoader(self.data.val_files, self.seq_len, t.batch_size, seed=t.seed)
        self.token_bytes = torch.as_tensor(self.data.tokenizer.token_byte_lengths(), dtype=torch.long)

    def _setup_instruct(self) -> None:
        """Instruction tuning: the base with its adapter (ltk/training/instruct_setup.py: whole, or on
        meta, loaded shard by shard as the engine is built), its tokenizer; the examples and their
        loader (ltk/training/instruct_run.py)."""
        from ltk.training.tokenizer import Tokenizer

        cfg = self.cfg
        self.tokenizer_file = self.base.tok_dir / "tokenizer.json"
        self.task = InstructTask(cfg, Tokenizer.load(self.base.tok_dir))
        self.objective = Instruct()
        self.seq_len = cfg.task.max_len
        # zero3 / fsdp2: built on meta, each rank reading its shard of the base as the engine is built;
        # else whole, scored before training (a resumed run reads that score from its checkpoint)
        if sharded_setup(cfg, self.rt.world_size):
            self.base_reader = BaseReader(self.base)
            self.model = adapted_on_meta(self._build_model(), cfg, self.base_reader, self.rt.device)
        else:
            self.model, self.before = whole_base(self._build_model(shardable=False), cfg, self.base, self.task,
                                                 self.rt.device, self.rt.autocast(), self.resume is None)
        self.model.activation_checkpointing = cfg.trainer.activation_checkpointing
        self.train_loader = self.task.loader

    def _build_model(self, shardable: bool = True) -> torch.nn.Module:
        """The model, whole on this device, or — where the engine shards it (ZeRO-3, tensor and
        pipeline parallelism) — with its parameters on the meta device, so that each rank only
        ever makes its own shard (ltk/models/init.py; the engine materializes it). Either way
        the weights are those of one process with this seed; the global RNG is left as it was."""
        p = self.cfg.parallel
        sharded = shardable and self.rt.world_size > 1 and (p.strategy in ("zero3", "fsdp2") or p.tp > 1 or p.pp > 1)
        build = lambda: self.family.model_cls(self.cfg.model)  # noqa: E731
        with torch.random.fork_rng(devices=[]):
            if sharded:
                return move_buffers(build_on_meta(build), self.rt.device)
            return build().to(self.rt.device)

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

    def _load(self, ckpt: Checkpoint) -> None:
        """Every rank reads the boxes it holds, whichever layout wrote the checkpoint (sharded or
        consolidated; ltk/training/reshard.py), then the loader position, step and RNG states.
        Adapters: only theirs, on the base the checkpoint names, if that base has not changed."""
        if self.base_ref is not None:
            check_reference(ckpt.state["base"], self.base, ckpt.path)
        self.before = ckpt.state.get("before")
        with open_reader(ckpt.path) as reader:
            if reader.by_position:  # a torch optimizer state dict by position, as single-process runs wrote before
                if self.rt.world_size > 1:
                    raise CheckpointError(f"{ckpt.path} holds its optimizer state by position (an older "
                                          "single-process run): resume it on one process")
                load_local_state(self.par, reader, optimizer=False)
                self.optimizer.load_state_dict(reader.trainer["optimizer"])
            else:
                load_local_state(self.par, reader)
            meta = reader.trainer  # rng, scaler: small
            if "scaler" in meta:
                self.scaler.load_state_dict(meta["scaler"])
            rng = meta["rng"]
        self.train_loader.load_state_dict(ckpt.state["loader"])  # a global position, the same on every rank
        self.step, self.tokens_seen = ckpt.state["step"], ckpt.state["tokens_seen"]
        restore_rng(rng, ckpt.state["host_rng"])

    # -- one step -----------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm)."""
        # bf16: the engine's parameters are bf16 already, no autocast (ltk/training/runtime.py)
        t, autocast = self.cfg.trainer, (nullcontext if self.rt.dtype == "bf16" else self.rt.autocast())
        if isinstance(self.par, ParallelRun):
            self.par.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, t.max_steps))
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        if isinstance(self.par, PipelineRun):
            return self._pipeline_step(clip)
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

    def _pipeline_step(self, clip: float) -> tuple[float, float]:
        """Pipeline parallelism: this rank's rows of all grad_accum micro-batches go through the
        schedule as its m micro-batches (ltk/parallel/pipeline_run.py)."""
        t = self.cfg.trainer
        xs, ys = zip(*(self.train_loader.next_batch() for _ in range(t.grad_accum)))
        x = torch.cat([self.par.rows(b) for b in xs]).to(self.rt.device)  # (grad_accum · B/dp, T)
        y = torch.cat([self.par.rows(b) for b in ys]).to(self.rt.device)
        loss = self.par.forward_backward(x, y)  # the global mean, the same on every rank
        grad_norm = self.par.clip_grad_norm_(clip)
        self.par.step()
        self.par.zero_grad()
        self.step += 1
        self.last_step_tokens = self.tokens_per_step
        self.tokens_seen += self.tokens_per_step
        return loss, grad_norm

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

    # -- checkpoints --------------------------------------------------------------------
    def save(self) -> Path | None:
        """A checkpoint of this step. Several processes: the sharded form, each rank writing what it
        holds (ltk/training/sharded_checkpoint.py; a collective). One process: the consolidated form,
        which every single-process reader and the HF export read directly; one process holds the
        whole model anyway, so sharding would save nothing."""
        trainer_state = {"rng": capture_rng()}
        if self.scaler.is_enabled():
            trainer_state["scaler"] = self.scaler.state_dict()
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.train_loader.state_dict(),
            "host_rng": capture_host_rng(),
            "config": self.cfg.to_dict(),
        }
        if self.before is not None:
            state["before"] = self.before
        if self.base_ref is not None:
            state["base"] = self.base_ref
        extra = {"tokenizer.json": self.tokenizer_file}
        if self.rt.world_size > 1:
            return save_sharded(self.par, self.run_dir, self.step, trainer_state, state,
                                keep_last=self.cfg.trainer.keep_last, extra_files=extra)
        trainer_state["optimizer"] = self.par.optimizer_state_dict()  # by parameter name
        weights, names = self.par.full_state_dict(), self.par.checkpoint_names
        if names is not None:  # an adapter: its weights, not the frozen base's
            weights = {k: v for k, v in weights.items() if k in names}
        return save_checkpoint(self.run_dir, self.step, weights, trainer_state, state,
                               keep_last=self.cfg.trainer.keep_last, extra_files=extra)

    # -- the loop -----------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)  # metrics.jsonl and the sinks of trainer.log_to (ltk/training/loggers.py)

    def _close_logs(self) -> None:
        """Every exit path: close the sinks, then draw loss.png from the rows logged so far."""
        try:
            self.logger.close()
        finally:
            if self.rt.is_main and plot_at_end():
                try:
                    plot_run(self.run_dir)
                except Exception as e:  # noqa: BLE001 - a failed plot must not hide the run's own error
                    print(f"warning: could not draw {self.run_dir / 'loss.png'}: {e}")

    def _plot_memory(self, per_rank: dict[str, Any]) -> None:
        """memory.png: every rank's trace beside the plan and 16Ψ (ltk/training/memory_plot.py)."""
        from ltk.training.memory_plot import plot_memory

        try:
            plot_memory(self.run_dir / "memory", self.run_dir / "memory.png", per_rank)
        except Exception as e:  # noqa: BLE001 - a failed plot must not fail a finished run
            print(f"warning: could not draw {self.run_dir / 'memory.png'}: {e}")

    def _step_size(self) -> str:
        t = self.cfg.trainer
        if self.task is None:
            return f"{self.tokens_per_step:,} tokens/step"
        return f"{t.batch_size * t.grad_accum} examples/step ({self.cfg.adapter.method} adapter)"

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
            if self.resume is not None or self.auto:
                folder.trim_metrics(self.step)  # rows of steps after the checkpoint are trained again
            (self.run_dir / "config.json").write_text(self.cfg.to_json())
            print(
                f"{self.cfg.family} model: {self.num_params:,} parameters | {self._step_size()} | "
                f"device {self.rt.device} ({self.rt.dtype}) x {self.rt.world_size} | run folder {self.run_dir}"
            )
        show = t.progress and self.rt.is_main and progress_enabled()  # a terminal, unless LTK_PROGRESS says
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not show, unit="step")
        last: dict[str, Any] = {}
        ckpt = None
        window_t, window_tokens, step_times, started = time.perf_counter(), 0, [], time.perf_counter()
        engine = getattr(self.par, "engine", None)  # ZeRO-3: the rank's shards, not the model's freed views
        detail = (lambda: memory_breakdown(self.model, self.optimizer, engine)) if self.task else None
        memory = MemoryProbe(self.par, self.rt.device, detail)  # bytes by category, measured on the first step
        # each rank's peak per phase (init, train, eval, save); with memory_trace a timeline (memory_watch.py)
        watch = MemoryWatch(self.rt.device, self.rt.rank, self.run_dir, trace=t.memory_trace,
                            interval_s=t.memory_trace_ms / 1e3)
        profile = RunProfile(self.run_dir / "profile", self.rt.device, active=t.profile_steps, first_step=self.step,
                             steps_left=t.max_steps - self.step, enabled=t.profile and self.rt.is_main)
        # multi-process runs: each step per rank split into compute / exposed comm / idle (ltk/parallel/timeline.py)
        timeline = Timeline(self.rt.device, enabled=self.rt.world_size > 1 and t.timeline)
        stop, stopping = StopOnSignal(self.rt, announce=self.rt.is_main), 0
        fault = Fault.from_env(self.rt.local_rank)  # LTK_FAULT: the restart tests' crash (ltk/training/faults.py)
        if self.rt.is_main:
            self.logger = open_loggers(self.sinks, self.run_dir, self.cfg.to_dict(), self.cfg.name)
        try:
            watch.start()  # the end of "init": data, model and engine are built
            profile.start()  # --profile: torch.profiler over a few steps, NVML over the run (ltk/training/profiling.py)
            with timeline, stop:
                while self.step < t.max_steps:
                    timeline.begin_step(self.step)
                    t0 = time.perf_counter()
                    with memory:
                        loss, grad_norm = self.train_step()
                    step_times.append(time.perf_counter() - t0)
                    timeline.end_step()
                    if fault:
                        fault.after_step(self.step)
                    stopping = stop.agreed()  # a signal: every rank saves after this same step and stops
                    window_tokens += self.last_step_tokens
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss became {loss} at step {self.step}; last checkpoint kept intact")
                    done = self.step == t.max_steps
                    do_eval = (t.eval_every > 0 and self.step % t.eval_every == 0) or done
                    if self.step % t.log_every == 0 or do_eval or self.step == 1:
                        if self.rt.device.type == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - window_t
                        tok_s = window_tokens / max(elapsed, 1e-9)
                        last = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                "grad_norm": grad_norm, "tokens": self.tokens_seen, "tokens_per_s": tok_s}
                        if self.peak:
                            last["mfu"] = tok_s * self.flops_per_token / self.peak
                        if do_eval:
                            with watch.phase("eval"):
                                last.update(self.evaluate())
                        self._log(last)
                        timeline.flush()  # collective: every rank logs at the same steps
                        window_t, window_tokens = time.perf_counter(), 0
                        shown = ("loss", "val_loss", "tokens_per_s", "mfu")
                        bar.set_postfix({k: f"{last[k]:.4g}" for k in shown if k in last})
                    bar.update(1)
                    if (t.ckpt_every > 0 and self.step % t.ckpt_every == 0) or done or stopping:
                        with watch.phase("save"):
                            ckpt = self.save()
                    profile.step()
                    if stopping:
                        break
                timeline.flush()
                timeline.write(self.run_dir)  # rank 0: timeline.json, timeline.png
        except KeyboardInterrupt:  # a second signal: the last checkpoint saved stays the one to resume
            if self.rt.is_main:
                print(f"\nstopped at once in step {self.step + 1}, nothing saved: the last checkpoint stays intact")
            raise
        finally:
            watch.stop()
            bar.close()
            profile.close()
            self._close_logs()
        ranks = watch.gather(self.rt.world_size)  # collective: every rank's peaks, on rank 0
        if self.rt.is_main and last:
            per_rank = memory_report(ranks, self.cfg, self.rt.world_size, self.rt.dtype, self.seq_len, self.num_params)
            summary = {"step": self.step, "params": self.num_params, "checkpoint": str(ckpt), **last,
                       "memory": memory.result, "memory_per_rank": per_rank, **profile.summary(),
                       **timeline.summary(), "seconds": time.perf_counter() - started}
            if step_times:
                summary["step_ms_median"] = 1e3 * sorted(step_times)[len(step_times) // 2]
            if self.task is not None:
                summary.update(self.task.summary(self.model, self.before, last, memory.result))
            if self.base_load is not None:  # rank 0's: what set-up held of the frozen base
                summary["base_load"] = self.base_load
            if self.init_from is not None:
                summary["init_from"] = str(self.init_from.path)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if t.memory_trace and plot_at_end():
                self._plot_memory(per_rank)
        if stopping and self.step < t.max_steps:
            raise TrainingStopped(stopping, self.step, ckpt)
        return TrainResult(self.run_dir, self.step, last, ckpt)
