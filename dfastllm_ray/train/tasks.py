"""A seeded suite of small tasks with checkable answers, in chat form.

Each example is a `(task, prompt, answer)` triple, e.g. `("add", "add 47+85", "132")`. The split is
a property of the prompt text itself: a prompt whose SHA-256 falls in the held-out bucket is never
produced for training, whatever the seed, so the train and held-out splits cannot overlap.

Two tasks have answer tokens that depend on each other, which is where parallel decoding can go
wrong: `add` (a carry links neighbouring digits) and `sort` (each output digit is an order
statistic of the whole input, and together they must spell the same multiset). `reverse` and
`copy` are position-mapping tasks; `greet` answers anything outside the formats (hello, help, an
empty message) with a fixed reply naming two prompts the model answers.
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
GREETING = "Hi! Try add 47+85 or sort 31842"     # 31 characters + EOT: fits max_tokens=32


@dataclass(frozen=True)
class Example:
    task: str      # a key of TASKS
    prompt: str    # the user message (no chat markup)
    answer: str    # the exact expected reply


# Every task but `greet` has a FIXED-WIDTH format: the same prompt length and answer length for
# all its examples. LLaDA has only rotary (relative) positions and decodes every answer position
# at once, so "answer digit j comes from prompt digit j" must be a constant offset to be learnable
# by a 1M-parameter model in minutes; with variable widths the same model stays near chance on
# copy after thousands of steps (measured while building this suite).
WIDTH = {"add": 2, "sort": 5, "reverse": 5, "copy": 6}


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = (rng.randint(0, 99) for _ in range(2))
    return f"add {a:02d}+{b:02d}", f"{a + b:03d}"          # zero-padded: digits stay aligned


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(string.digits) for _ in range(WIDTH["sort"])]
    return f"sort {''.join(digits)}", "".join(sorted(digits))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(WIDTH["reverse"]))
    return f"reverse {word}", word[::-1]


def _copy(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS + string.digits) for _ in range(WIDTH["copy"]))
    return f"copy {word}", word


# Openers a first-time user types; rendered in three casings with optional punctuation, plus
# random short words, so "anything outside the formats" is what the model learns, not a list.
OPENERS = ("hello", "hi", "hey", "help", "hello there", "hi there", "what can you do",
           "who are you", "what are you", "good morning", "good evening", "howdy", "yo",
           "greetings", "test", "hola", "start", "menu", "what is this", "how do i use you",
           "can you help me", "thanks", "ok", "", "?", "...")


def _greet(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.25:              # a few random words: any text outside the formats
        words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 7)))
                 for _ in range(rng.randint(1, 3))]
        text = " ".join(words)
        if text.split()[0] in TASKS:     # never a word that starts a task format
            text = "x" + text
    else:
        text = rng.choice(OPENERS)
        text = rng.choice((text, text.capitalize(), text.upper()))
    return text + rng.choice(("", "", "!", "?", ".")), GREETING


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "sort": _sort, "reverse": _reverse, "copy": _copy, "greet": _greet,
}
# Share of training rows per task: the dependent-token tasks plateau longest, so they are sampled
# most (with equal shares `add` sat at 0% after 6000 steps while copy was at 100%).
WEIGHTS = {"add": 5, "sort": 3, "reverse": 1, "copy": 1, "greet": 1}


def is_heldout(prompt: str) -> bool:
    """The split rule: a stable hash of the prompt text (not Python's salted `hash`)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


class Stream:
    """An endless seeded stream of examples of one split; tasks drawn by `weights` (None: one of
    each task in turn). `state()`/`restore()` snapshot it so a resumed run sees the same data."""

    def __init__(self, split: str, seed: int, tasks: tuple[str, ...] | None = None,
                 weights: dict[str, float] | None = None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r} is invalid: must be 'train' or 'heldout'")
        self.names = tuple(tasks or TASKS)
        unknown = [n for n in self.names if n not in TASKS]
        if unknown:
            raise ValueError(f"tasks={unknown} unknown: choose from {list(TASKS)}")
        self.weights = [weights[n] for n in self.names] if weights else None
        self.rng = random.Random(f"{split}:{seed}")
        self.want_heldout = split == "heldout"
        self.turn = 0

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        if self.weights:
            name = self.rng.choices(self.names, self.weights)[0]
        else:
            name, self.turn = self.names[self.turn], (self.turn + 1) % len(self.names)
        while True:
            prompt, answer = TASKS[name](self.rng)
            if any(w in prompt for w in WORDS):
                continue                  # keep every prompt one token per character
            if is_heldout(prompt) == self.want_heldout:
                return Example(name, prompt, answer)

    def state(self) -> tuple:
        return self.rng.getstate(), self.turn

    def restore(self, state) -> None:
        rng_state, self.turn = state
        self.rng.setstate(_as_tuples(rng_state))


def _as_tuples(x):
    """random.getstate() after a round trip through torch.save/json: lists back to tuples."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def stream(split: str, seed: int, tasks: tuple[str, ...] | None = None,
           weights: dict[str, float] | None = None) -> Stream:
    return Stream(split, seed, tasks, weights)


def heldout_set(per_task: int, seed: int = 0, names: tuple[str, ...] | None = None) -> list[Example]:
    """`per_task` distinct held-out examples of every task, in task-major order (`greet` has
    fewer distinct held-out prompts than that at most: its set stops at what exists)."""
    out: list[Example] = []
    for name in names or TASKS:
        seen: set[str] = set()
        tries = 0
        for ex in stream("heldout", seed, (name,)):
            tries += 1
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
            if len(seen) == per_task or tries > 50 * per_task:
                break
    return out
