"""The instruction task of the training loop (`task.kind = "instruct"`): the examples, a loader
that resumes exactly, and the evaluation.

    examples     load_examples(task.data), split into train / val (identical prompts on one side);
                 with task.chat_template or task.stream, the rows of the .jsonl encoded by
                 instruct_stream.row_encoder and split by a hash of their prompt (val: at most
                 task.val_rows, encoded once)
    loader       batches(train, shuffle, seed) as ltk/training/instruct.py draws them: padded (x, y)
                 or packed (x, y, segments); its position is the number of batches drawn, so a
                 resumed run draws the same batches as an uninterrupted one. task.stream: the
                 file read row by row through a shuffle buffer (StreamLoader), its position the
                 stream's (byte offset, buffered rows, generator state), so nothing is replayed
    loss         the mean cross-entropy over the response tokens (labels -100 on the prompt and
                 the padding; with a chat template, on every assistant turn), the objective
                 `Instruct` (ltk/training/objectives.py)
    evaluation   val_loss: Σ nats / Σ response tokens over every val example (padded batches),
                 val_ppl = exp(val_loss); on the built-in task, exact match of greedy answers on
                 the first task.eval_examples val examples, in all and by kind

Each optimizer step takes trainer.grad_accum batches of trainer.batch_size examples.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ltk.training.config import RunConfig
from ltk.training.instruct import batches, exact_match, load_examples, split
from ltk.training.packing import real_tokens


class _Counted:
    """The batches drawn, and the slots and real tokens seen (packing efficiency)."""

    def _reset(self) -> None:
        self.drawn, self.tokens, self.slots, self.last_tokens = 0, 0, 0, 0
        self.batch_tokens = 0  # slots of the last batch, (B · T)

    def _count(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.drawn += 1
        self.last_tokens = real_tokens(batch[1], batch[2] if len(batch) > 2 else None)
        self.batch_tokens = batch[0].numel()
        self.tokens, self.slots = self.tokens + self.last_tokens, self.slots + self.batch_tokens
        return batch

    def _counts(self) -> dict[str, int]:
        return {"batches": self.drawn, "tokens": self.tokens, "slots": self.slots}

    def _restore(self, state: dict[str, Any]) -> None:
        self.drawn, self.tokens, self.slots = state["batches"], state["tokens"], state["slots"]


class InstructLoader(_Counted):
    """next_batch() -> (x, y) or, packing, (x, y, segments); state_dict() / load_state_dict() as
    TokenLoader's (ltk/training/loader.py), plus the slots and real tokens seen (packing efficiency)."""

    def __init__(self, examples, tok, batch_size: int, max_len: int, seed: int, packing: bool):
        self._make = lambda: batches(examples, tok, batch_size, max_len, shuffle=True, seed=seed, packing=packing)
        self._stream = self._make()
        self._reset()

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self._count(next(self._stream))

    def state_dict(self) -> dict[str, int]:
        return self._counts()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._stream = self._make()
        for _ in range(state["batches"]):  # the batches are drawn from (seed, epoch): replay the order
            next(self._stream)
        self._restore(state)


class StreamLoader(_Counted):
    """InstructLoader's interface over the training rows of a JSONL file read row by row
    (ltk/training/instruct_stream.py: a shuffle buffer of `buffer` rows, epochs seeded by (seed,
    epoch)); padded or packed batches. Its position is the stream's, JSON in state.json: a resumed
    run reads on from the byte offset it stopped at, the buffered rows re-read by their offsets."""

    def __init__(self, path: str, encode, tok, batch_size: int, max_len: int, seed: int, packing: bool,
                 val_fraction: float, buffer: int):
        from ltk.training.instruct_stream import JsonlStream, StreamBatches

        rows = JsonlStream(path, split="train", val_fraction=val_fraction, seed=seed, buffer=buffer)
        self._batches = StreamBatches(rows, encode, batch_size, tok.eot_id, packing=packing, max_len=max_len)
        self._reset()

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self._count(next(self._batches))

    def state_dict(self) -> dict[str, Any]:
        return {**self._counts(), "stream": self._batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches.load_state_dict(state["stream"])
        self._restore(state)


class InstructTask:
    """The examples of cfg.task, the tokenizer of the base, the loader and the evaluation."""

    def __init__(self, cfg: RunConfig, tok):
        task, t = cfg.task, cfg.trainer
        self.cfg, self.tok = cfg, tok
        self.builtin = task.data == "builtin" or task.data.startswith("builtin:")  # never with rows: check_run
        if task.stream or task.chat_template is not None:
            self._rows(cfg, tok)
            return
        examples = load_examples(task.data, limit=task.limit)
        self.train, self.val = split(examples, task.val_fraction, t.seed)
        self.loader = InstructLoader(self.train, tok, t.batch_size, task.max_len, t.seed, task.packing)

    def _rows(self, cfg: RunConfig, tok) -> None:
        """The .jsonl's rows through instruct_stream's encoder (the chat template's where one is given):
        val by the hash split, encoded once; train streamed, or read whole (at most task.limit rows)."""
        from ltk.training.chat_template import template_for
        from ltk.training.instruct_stream import read_split, read_val, row_encoder

        task, t = cfg.task, cfg.trainer
        template = template_for(task.chat_template, task.base) if task.chat_template is not None else None
        encode = row_encoder(tok, task.max_len, template)
        self.val = read_val(task.data, encode, val_fraction=task.val_fraction, seed=t.seed, limit=task.val_rows)
        if task.stream:
            self.train = None  # never held: the loader reads the file as it goes
            self.loader = StreamLoader(task.data, encode, tok, t.batch_size, task.max_len, t.seed, task.packing,
                                       task.val_fraction, task.stream_buffer)
            return
        self.train = read_split(task.data, encode, "train", val_fraction=task.val_fraction, seed=t.seed,
                                limit=task.limit)
        if not self.train:
            raise ValueError(f"{task.data}: every row falls in the val split at val_fraction {task.val_fraction}")
        self.loader = InstructLoader(self.train, tok, t.batch_size, task.max_len, t.seed, task.packing)

    @torch.no_grad()
    def evaluate(self, model, device: torch.device, autocast: Callable = nullcontext) -> dict[str, float]:
        from ltk.training.objectives import causal_loss

        was = model.training
        model.eval()
        nats, n = 0.0, 0
        with autocast():
            for x, y in batches(self.val, self.tok, self.cfg.trainer.batch_size, self.cfg.task.max_len,
                                shuffle=False, epochs=1):
                x, y = x.to(device), y.to(device)
                k = int((y != -100).sum())
                nats += causal_loss(model, x, y).item() * k
                n += k
            out = {"val_loss": nats / max(n, 1)}
            out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
            if self.builtin:
                scores = exact_match(model, self.tok, self.val[:self.cfg.task.eval_examples], device=device,
                                     by_kind=True)
                out["exact_match"] = scores.pop("all")
                out.update({f"exact_match/{kind}": v for kind, v in scores.items()})
        model.train(was)
        return out

    def summary(self, model, before: dict | None, last: dict[str, Any], memory: dict | None) -> dict[str, Any]:
        """What a fine-tuning run's summary.json adds: the method, what trained, the scores before
        and after, memory by component (frozen base, NF4 codes, adapters: MemoryProbe's detail,
        ltk/models/qlora.py `memory_breakdown`), the data and its packing."""
        cfg, lo = self.cfg, self.loader
        return {"method": cfg.adapter.method, "family": cfg.family, "base": cfg.task.base,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "before": before, "after": {k: v for k, v in last.items() if k.startswith(("val", "exact"))},
                "memory": (memory or {}).get("detail"), "data": cfg.task.data,
                "train_examples": None if self.train is None else len(self.train),
                "val_examples": len(self.val), "stream": cfg.task.stream, "chat_template": cfg.task.chat_template,
                "packing": cfg.task.packing, "batch_tokens": lo.batch_tokens,
                "packing_efficiency": lo.tokens / max(lo.slots, 1)}
