"""The built-in instruction task: three small problems whose answers can be checked exactly.

Each example is one of (in turn, so the mix is balanced):

    reverse   "Reverse the order of these words."   input "fox sun tree"   -> "tree sun fox"
    sort      "Sort these numbers from smallest to largest."  "7 13 2"     -> "2 7 13"
    add       "Add these two numbers."              input "12 + 9"         -> "21"

Why these. Every answer is a pure function of the input with exactly one correct string, so
the score of a model is the exact-match rate of its greedy answer (training/instruct.py
exact_match): no judge, no fuzzy metric, no partial credit to argue about. The three tasks
need different skills from the same weights: copying tokens in reverse order (attention to
a position that moves), comparing numbers (sort), and a small lookup table (add). The
instruction line is the only thing that says which one is wanted, so a model that scores
well must read the instruction, which is the point of instruction tuning.

Why small. Words come from a list of 16, numbers are 0..19 (sort) and 0..19 + 0..19 (add),
and inputs hold 3..5 items, so a prompt is a few dozen BPE tokens and the answer under ten,
sized for a ~1M-parameter model on a CPU. (Measured: a 0.87M GPT, 4 layers x 128, AdamW
3e-3, batch 32, BPE 512, reached a response loss of 2.0 after 800 steps, 4 minutes on one
thread, with val exact match still 0.02: learning the mix takes longer than that.) The inputs are still varied
enough (16^3 + 16^4 + 16^5 word lists, 400 sums) that a validation split that keeps
identical prompts apart (instruct.split) tests generalisation, not recall.

Prompts use the Alpaca template (instruct.render_alpaca), the same as any loaded data.
"""
from __future__ import annotations

import random

WORDS = ("apple", "river", "stone", "cloud", "tiger", "paper", "green", "house",
         "light", "music", "ocean", "quiet", "sugar", "train", "wind", "yellow")
MAX_NUMBER = 19  # sort draws from 0..MAX_NUMBER, add adds two of them
MIN_ITEMS, MAX_ITEMS = 3, 5  # items in a reverse or sort input

INSTRUCTIONS = {
    "reverse": "Reverse the order of these words.",
    "sort": "Sort these numbers from smallest to largest.",
    "add": "Add these two numbers.",
}
KINDS = tuple(INSTRUCTIONS)


def solve(kind: str, input: str) -> str:
    """The one correct answer to a built-in task input: the ground truth of the task."""
    if kind == "reverse":
        return " ".join(reversed(input.split()))
    if kind == "sort":
        return " ".join(str(v) for v in sorted(int(t) for t in input.split()))
    if kind == "add":
        a, plus, b = input.split()
        if plus != "+":
            raise ValueError(f"an add input looks like '3 + 4', got {input!r}")
        return str(int(a) + int(b))
    raise ValueError(f"unknown built-in task kind {kind!r}; expected one of {KINDS}")


def draw_input(kind: str, rng: random.Random) -> str:
    """A random input for `kind`, drawn with `rng`."""
    if kind == "reverse":
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS)))
    if kind == "sort":
        return " ".join(str(rng.randint(0, MAX_NUMBER)) for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS)))
    if kind == "add":
        return f"{rng.randint(0, MAX_NUMBER)} + {rng.randint(0, MAX_NUMBER)}"
    raise ValueError(f"unknown built-in task kind {kind!r}; expected one of {KINDS}")


def task_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n Alpaca rows {"kind", "instruction", "input", "output"}, kinds in turn, inputs drawn
    with random.Random(seed): the same rows for the same (n, seed) on every machine."""
    if n < 1:
        raise ValueError(f"the built-in task needs n >= 1 examples, got {n}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        text = draw_input(kind, rng)
        rows.append({"kind": kind, "instruction": INSTRUCTIONS[kind], "input": text, "output": solve(kind, text)})
    return rows
