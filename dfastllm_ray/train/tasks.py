"""A seeded suite of small tasks with checkable answers, in chat form.

Each example is a `(task, prompt, answer)` triple, e.g. `("add", "add 47+85", "132")`. The split is
a property of the prompt text itself: a prompt whose SHA-256 falls in the held-out bucket is never
produced for training, whatever the seed, so the train and held-out splits cannot overlap.
"""
from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable, Iterator

from .tokenizer import WORDS

HELDOUT_PERCENT = 10        # share of all possible prompts reserved for evaluation
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    task: str      # a key of TASKS
    prompt: str    # the user message (no chat markup)
    answer: str    # the exact expected reply


# Every task has a FIXED-WIDTH format: the same prompt length and answer length for all its
# examples. LLaDA has only rotary (relative) positions and decodes every answer position at once,
# so "answer digit j comes from prompt digit j" must be a constant offset to be learnable by a
# 1M-parameter model in minutes; with variable widths the same model stays near chance on copy
# after thousands of steps (measured while building this suite).
WIDTH = {"add": 2, "sub": 2, "sort": 5, "reverse": 5, "copy": 6, "lookup": 3, "count": 6}


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = (rng.randint(0, 99) for _ in range(2))
    return f"add {a:02d}+{b:02d}", f"{a + b:03d}"          # zero-padded: digits stay aligned


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, 99) for _ in range(2)), reverse=True)   # non-negative result
    return f"sub {a:02d}-{b:02d}", f"{a - b:02d}"


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(string.digits) for _ in range(WIDTH["sort"])]
    return f"sort {''.join(digits)}", "".join(sorted(digits))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, WIDTH["reverse"])
    return f"reverse {word}", word[::-1]


def _copy(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS + string.digits) for _ in range(WIDTH["copy"]))
    return f"copy {word}", word


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, WIDTH["lookup"])
    values = [rng.choice(string.digits) for _ in keys]
    i = rng.randrange(len(keys))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"get {keys[i]} from {pairs}", values[i]


def _count(rng: random.Random) -> tuple[str, str]:
    alphabet = rng.sample("abcde", 3)             # few letters so counts above 1 are common
    word = "".join(rng.choice(alphabet) for _ in range(WIDTH["count"]))
    letter = rng.choice(alphabet)
    return f"count {letter} in {word}", str(word.count(letter))


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "sub": _sub, "sort": _sort, "reverse": _reverse,
    "copy": _copy, "lookup": _lookup, "count": _count,
}


def is_heldout(prompt: str) -> bool:
    """The split rule: a stable hash of the prompt text (not Python's salted `hash`)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


def stream(split: str, seed: int, tasks: tuple[str, ...] | None = None) -> Iterator[Example]:
    """An endless seeded stream of examples of one split, tasks taken round-robin."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is invalid: must be 'train' or 'heldout'")
    names = tuple(tasks or TASKS)
    rng = random.Random(f"{split}:{seed}")
    want_heldout = split == "heldout"
    while True:
        for name in names:
            while True:
                prompt, answer = TASKS[name](rng)
                if any(w in prompt for w in WORDS):
                    continue                  # keep every prompt one token per character
                if is_heldout(prompt) == want_heldout:
                    yield Example(name, prompt, answer)
                    break


def heldout_set(per_task: int, seed: int = 0) -> list[Example]:
    """`per_task` distinct held-out examples of every task, in task-major order."""
    out: list[Example] = []
    for name in TASKS:
        seen: set[str] = set()
        for ex in stream("heldout", seed, (name,)):
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
            if len(seen) == per_task:
                break
    return out
