"""Instruction-tuning data: templates, loss masks, padded batches and exact-match scoring.

An example is a (prompt, response) pair of text. For a causal LM it becomes one sequence

    ids    = prompt tokens p_1..p_P  +  response tokens r_1..r_R  +  [eot]
    x      = ids[:-1],  y = ids[1:]                      (predict the next token)
    y_t    = -100 wherever the target ids[t+1] is a prompt token

so the loss, mean cross-entropy over the positions with y != -100 (F.cross_entropy's
ignore_index), is -(1/(R+1)) sum_j log p(r_j | prompt, r_<j) - (1/(R+1)) log p(eot | ...).

Why the prompt is masked. The model must learn to answer, not to write prompts: the
templates and instructions are given at inference time, and spending capacity (and, on
small data, most of the gradient, as prompts are often longer than answers) on predicting
them would teach the wrong thing (InstructGPT, Ouyang et al. 2022, and Alpaca train on the
response only). The prompt tokens are still in x, so they shape every hidden state that
predicts the response; only their own prediction goes unscored.

Why the end-of-text token is learned. Generation stops when the model emits eot
(ltk/models/generate.py stop_token). A model that never saw eot as a target after an answer
keeps writing past it (another "### Instruction:", or repeats), so the eot after the
response is a target like any response token.

Templates. Alpaca (Taori et al. 2023, Stanford Alpaca) for instruction/input/output rows,
see TEMPLATE; chat rows {"messages": [...]} with "### System:/### User:/### Assistant:"
headers in the same style (render_chat). The response follows the header line directly.

Batches. By default each example is its own row (padding, not packing): right-padded with
eot in x and -100 in y. Right padding is exact for a causal model: a position attends only
to the left, so the pad tokens never change the logits of the real positions, and their
targets are ignored. With packing=True the same runs of examples are packed several to a
row instead, kept apart by segment ids (ltk/training/packing.py): fewer slots, the same loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ltk.training.instruct_task import KINDS, kind_of, parse_kinds, task_rows

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
BUILTIN_SIZE, BUILTIN_SEED = 3000, 0  # load_examples("builtin")

TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}"
    "### Response:\n"
)
"""The Alpaca prompt. With an input (Alpaca's "prompt_input"):

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    <the response is written here, then eot>

Without an input ("prompt_no_input") the ", paired with ..." clause and the Input block go.
It differs from Alpaca's only by the newline after "### Response:", so the response starts
on its own line and its first token is not glued to the header by the BPE."""

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    prompt: str  # everything the model is given (template applied)
    response: str  # what it must learn to write (without the end-of-text token)


def render_alpaca(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (TEMPLATE) for an instruction and optional input."""
    if input:
        return TEMPLATE.format(with_input=", paired with an input that provides further context",
                               instruction=instruction, input_block=f"### Input:\n{input}\n\n")
    return TEMPLATE.format(with_input="", instruction=instruction, input_block="")


def render_chat(messages: list[dict]) -> tuple[str, str]:
    """messages -> (prompt, the content of the last assistant message).

    Every message before the last assistant one is written into the prompt under a
    "### System:", "### User:" or "### Assistant:" header (earlier assistant turns are
    context, not targets); the prompt ends with the header of the answer, "### Assistant:\\n".
    The conversation must end with that assistant message, and a system message may only
    come first.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {CHAT_ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i} is a system message; only the first message may be one")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages have no assistant turn: nothing to learn")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role {messages[-1]['role']!r}")
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages[:-1])
    return turns + "### Assistant:\n", messages[-1]["content"]


def builtin_task(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Example]:
    """n examples of the built-in task (ltk/training/instruct_task.py: last / lookup / reverse /
    sort, or the `kinds` given, in turn)."""
    return [Example(render_alpaca(r["instruction"], r["input"]), r["output"]) for r in task_rows(n, seed, kinds)]


def builtin_kind(ex: Example) -> str:
    """The built-in task kind of an example, read from its prompt's instruction line."""
    try:
        instruction = ex.prompt.split("### Instruction:\n", 1)[1].split("\n", 1)[0]
    except IndexError:
        raise ValueError("not an Alpaca prompt: no '### Instruction:' line") from None
    return kind_of(instruction)


def load_examples(source: str, limit: int | None = None) -> list[Example]:
    """"builtin" (BUILTIN_SIZE examples, or `limit`; seed BUILTIN_SEED), "builtin:KIND,KIND" (those
    kinds only, e.g. builtin:last,lookup), or a .jsonl file of Alpaca rows
    {"instruction", "input" (optional), "output"} or chat rows {"messages": [...]}; the first
    row decides which, and every row must then be of that kind. The first `limit` examples."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
    if source == "builtin" or source.startswith("builtin:"):
        # Inputs are drawn one after another, so builtin_task(k) is the first k of any longer run.
        return builtin_task(limit or BUILTIN_SIZE, BUILTIN_SEED, parse_kinds(source.partition(":")[2]))
    path = Path(source).expanduser()
    if path.suffix != ".jsonl":
        raise ValueError(f"data source must be 'builtin', 'builtin:KIND,...' or a .jsonl file, got {source!r}")
    if not path.is_file():
        raise FileNotFoundError(f"instruction data not found: {path}")
    examples: list[Example] = []
    kind = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            row_kind = "chat" if "messages" in row else "alpaca"
            kind = kind or row_kind
            if row_kind != kind:
                raise ValueError(f"{where}: a {row_kind} row in a file of {kind} rows (the first row decides)")
            examples.append(_chat_row(row, where) if kind == "chat" else _alpaca_row(row, where))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{path} holds no examples (every line is empty)")
    return examples


def _alpaca_row(row: dict, where: str) -> Example:
    for name in ("instruction", "output"):
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r} (an Alpaca row has instruction, input, output)")
    for name in ("instruction", "input", "output"):
        if name in row and not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return Example(render_alpaca(row["instruction"], row.get("input", "")), row["output"])


def _chat_row(row: dict, where: str) -> Example:
    try:
        return Example(*render_chat(row["messages"]))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def encode_example(tok, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both of length L - 1 for ids = prompt + response + [eot] (L <= max_len).

    labels[t] = ids[t + 1], or -100 where ids[t + 1] is a prompt token: of the P prompt
    tokens the first P - 1 targets are masked, then come r_1 .. r_R, eot.
    Truncation: if L > max_len, the prompt loses tokens from the left (its oldest text, the
    template's preamble first) until L = max_len; the response is never cut. At least one
    prompt token must stay, to predict r_1 from, so an error if R + 2 > max_len.
    """
    prompt, response = tok.encode(ex.prompt), tok.encode(ex.response)
    if not prompt:
        raise ValueError("the prompt is empty: the first response token would have nothing to follow")
    keep = max_len - len(response) - 1  # prompt tokens that fit
    if keep < 1:
        raise ValueError(f"max_len={max_len} is too short: the response is {len(response)} tokens, and with the "
                         f"end-of-text token and one prompt token it needs max_len >= {len(response) + 2}")
    prompt = prompt[-keep:]
    ids = prompt + response + [tok.eot_id]
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]
    return ids[:-1], labels


def batches(examples, tok, batch_size: int, max_len: int, *, shuffle: bool = True, seed: int = 0,
            epochs: int | None = None, packing: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """(x, y) int64 of shape (B, T), T = the longest encoded example of the batch (<= max_len - 1).
    An example is an Example, or an (input_ids, labels) pair encoded already.

    Epoch e visits every example once, in a permutation drawn from numpy's generator seeded
    with (seed, e) (file order when shuffle is False), in runs of batch_size; the last run of
    an epoch may be shorter. epochs=None repeats forever. Rows are right-padded with eot in
    x and -100 in y, so padding adds nothing to the loss (see the module docstring).

    packing=True: each run is packed into rows of <= max_len tokens, as few slots as it fits
    in (ltk/training/packing.py `pack_batch`); the batches are (x, y, segments), B <= batch_size.
    """
    if batch_size < 1 or max_len < 2:
        raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size} and {max_len}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (forever), got {epochs}")
    if not examples:
        raise ValueError("batches needs at least one example")
    encoded = []
    for i, ex in enumerate(examples):
        if isinstance(ex, tuple):  # already (input_ids, labels): a chat template's (ltk/training/instruct_stream.py)
            encoded.append(ex)
            continue
        try:
            encoded.append(encode_example(tok, ex, max_len))
        except ValueError as e:
            raise ValueError(f"example {i}: {e}") from None
    runs = _runs(len(encoded), batch_size, shuffle, seed, epochs)
    if packing:
        from ltk.training.packing import pack_batch

        return (pack_batch([encoded[i] for i in run], max_len, tok.eot_id) for run in runs)
    return (_pad_batch([encoded[i] for i in run], tok.eot_id) for run in runs)


def _runs(n, batch_size, shuffle, seed, epochs) -> Iterator[list[int]]:
    """The example indices of each batch, epoch after epoch (see `batches`)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(np.random.default_rng([seed, epoch]).permutation(n) if shuffle else range(n))
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]
        epoch += 1


def _pad_batch(rows, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for r, (ids, labels) in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        y[r, :len(labels)] = torch.tensor(labels, dtype=torch.long)
    return x, y


def split(examples, val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): about val_fraction of the examples in val, drawn with numpy's generator
    seeded with `seed`; each side keeps the original order.

    Identical prompts always land on the same side (groups are drawn, not examples), so a
    val score measures answers to prompts the model was never trained on, not recall of
    duplicates (the built-in task draws its inputs at random and repeats some).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.prompt, []).append(i)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split into train and val, got {len(groups)}")
    keys = list(groups)
    target = max(1, round(len(examples) * val_fraction))
    val_idx: set[int] = set()
    for k in np.random.default_rng(seed).permutation(len(keys)):
        if len(val_idx) >= target or len(val_idx) + len(groups[keys[k]]) == len(examples):
            break
        val_idx.update(groups[keys[k]])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def generate_responses(model, tok, prompts: list[str], max_new_tokens: int = 32, device="cpu",
                       batch_size: int = 16) -> list[str]:
    """Greedy answers to `prompts`, the text before the first eot (or all max_new_tokens).

    Prompts of the same token length are decoded together (up to batch_size at a time): no
    padding, so a batched answer is exactly the answer decoded alone. The context is cut to
    the model's config.block_size when it has one.
    """
    from ltk.models.generate import generate

    encoded = [tok.encode(p) for p in prompts]
    limit = getattr(getattr(model, "config", None), "block_size", None)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        by_len.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    for n, idxs in by_len.items():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start:start + batch_size]
            idx = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)  # (b, n)
            gen = generate(model, idx, max_new_tokens, block_size=limit or n + max_new_tokens, temperature=0.0,
                           top_k=None, stop_token=tok.eot_id)
            for i, row in zip(chunk, gen[:, n:].tolist()):
                out[i] = tok.decode(row[:row.index(tok.eot_id)] if tok.eot_id in row else row)
    return out


def exact_match(model, tok, examples, max_new_tokens: int = 32, device="cpu", batch_size: int = 16,
                by_kind: bool = False) -> float | dict[str, float]:
    """Fraction of examples whose greedy answer, stripped, equals the response, stripped.
    by_kind (built-in task): {"all": fraction, kind: fraction for each kind present}."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    answers = generate_responses(model, tok, [ex.prompt for ex in examples], max_new_tokens, device, batch_size)
    hits = [a.strip() == ex.response.strip() for a, ex in zip(answers, examples)]
    if not by_kind:
        return sum(hits) / len(examples)
    groups: dict[str, list[bool]] = {}
    for hit, ex in zip(hits, examples):
        groups.setdefault(builtin_kind(ex), []).append(hit)
    return {"all": sum(hits) / len(hits), **{k: sum(v) / len(v) for k, v in sorted(groups.items())}}
