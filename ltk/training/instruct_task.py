"""The built-in instruction task: four small problems on letter lists whose answers can be
checked exactly.

Each example is one of (in turn, so the mix is balanced):

    last      "Which letter comes last?"              input "q f m"          -> "m"
    lookup    "What is the value of c?"               input "a = x\\nc = k"  -> "k"
    reverse   "Reverse the order of these letters."   input "q f m"          -> "m f q"
    sort      "Sort these letters alphabetically."    input "q f m"          -> "f m q"

Why these. Every answer is a pure function of the input with exactly one correct string, so
a model's score is the exact-match rate of its greedy answer (ltk/training/instruct.py
exact_match): no judge, no fuzzy metric. The four need different skills from the same
weights: attending to a fixed place (last), matching a key and copying what follows it
(lookup, an induction-head pattern; Olsson et al. 2022), copying in a moving order
(reverse) and comparing (sort). Only the instruction says which is wanted, so a model that
scores well must read it, which is the point of instruction tuning.

Why letters. A single lower-case letter is one token of any byte-level BPE, with or without
the space before it, so every answer is a copy of input tokens and the task does not depend
on how a tokenizer happened to split words. (Measured with the gpt-debug tokenizer, a
2048-token BPE of Python source: "apple" is three tokens, " apple" two, and a model must
learn to map one spelling to the other before it can copy.) Inputs hold 3..5 letters drawn
from 26, lookups 3..5 keys from "abcdefgh": 26^3 + 26^4 + 26^5 lists, so a validation split
that keeps identical prompts apart (instruct.split) tests generalisation, not recall.

What it shows about the methods (lab `finetune`). Copying needs attention heads that copy —
induction heads, which a base forms in pre-training. LoRA adapts what the base can do with
a low-rank change; it cannot build a copying circuit its base lacks (measured: a gpt-debug
base pre-trained 400 steps learns `last` to 100% under full fine-tuning in 300 steps and to
2% under LoRA; a base pre-trained 2000 steps learns it to 98% under LoRA).

Prompts use the Alpaca template (instruct.render_alpaca), the same as any loaded data.
"""
from __future__ import annotations

import random
import string

LETTERS = string.ascii_lowercase
KEYS = "abcdefgh"  # lookup keys
MIN_ITEMS, MAX_ITEMS = 3, 5  # letters in a list, keys in a lookup

INSTRUCTIONS = {
    "last": "Which letter comes last?",
    "lookup": "What is the value of {key}?",
    "reverse": "Reverse the order of these letters.",
    "sort": "Sort these letters alphabetically.",
}
KINDS = tuple(INSTRUCTIONS)


def kind_of(instruction: str) -> str:
    """The kind of a built-in instruction (the inverse of INSTRUCTIONS)."""
    for kind, text in INSTRUCTIONS.items():
        head = text.split("{")[0]
        if instruction == text or ("{" in text and instruction.startswith(head)):
            return kind
    raise ValueError(f"not a built-in task instruction: {instruction!r}")


def parse_kinds(spec: str | None) -> tuple[str, ...]:
    """"last,lookup" -> ("last", "lookup"); None or "" -> every kind. Unknown names raise."""
    if not spec:
        return KINDS
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown built-in task kind(s) {bad or spec!r}; choose from {', '.join(KINDS)}")
    return kinds


def solve(kind: str, instruction: str, input: str) -> str:
    """The one correct answer to a built-in task example: the ground truth of the task."""
    if kind == "last":
        return input.split()[-1]
    if kind == "reverse":
        return " ".join(reversed(input.split()))
    if kind == "sort":
        return " ".join(sorted(input.split()))
    if kind == "lookup":
        key = instruction.rstrip("?").split()[-1]
        table = dict(line.split(" = ") for line in input.splitlines())
        if key not in table:
            raise ValueError(f"lookup key {key!r} is not in the input {input!r}")
        return table[key]
    raise ValueError(f"unknown built-in task kind {kind!r}; expected one of {KINDS}")


def draw(kind: str, rng: random.Random) -> tuple[str, str]:
    """(instruction, input) for `kind`, drawn with `rng`."""
    n = rng.randint(MIN_ITEMS, MAX_ITEMS)
    if kind == "lookup":
        keys = rng.sample(KEYS, n)
        table = "\n".join(f"{k} = {rng.choice(LETTERS)}" for k in keys)
        return INSTRUCTIONS["lookup"].format(key=rng.choice(keys)), table
    if kind in INSTRUCTIONS:
        return INSTRUCTIONS[kind], " ".join(rng.choice(LETTERS) for _ in range(n))
    raise ValueError(f"unknown built-in task kind {kind!r}; expected one of {KINDS}")


def task_rows(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[dict[str, str]]:
    """n Alpaca rows {"kind", "instruction", "input", "output"}, `kinds` in turn, inputs drawn
    with random.Random(seed): the same rows for the same (n, seed, kinds) on every machine."""
    if n < 1:
        raise ValueError(f"the built-in task needs n >= 1 examples, got {n}")
    kinds = parse_kinds(",".join(kinds))
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        instruction, text = draw(kind, rng)
        rows.append({"kind": kind, "instruction": instruction, "input": text,
                     "output": solve(kind, instruction, text)})
    return rows
