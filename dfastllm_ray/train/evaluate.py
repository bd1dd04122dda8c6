"""Held-out accuracy of a checkpoint with LLaDA's reference schedule, no engine needed.

`decode` is the LLaDA `generate` loop at temperature 0 with `low_confidence` remasking and one
token per step (REFERENCE_ALGORITHMS.md section 2): each step commits the masked position, up to
the current block's end, whose argmax token has the highest probability. The engine's own
policies are measured by benchmarks/quality.py; this loop is the trainer's yardstick.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from . import tasks


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, gen_length: int, block_length: int,
           mask_id: int) -> torch.Tensor:
    """prompt (B, Lp) int64, same length in every row -> generated ids (B, gen_length)."""
    if gen_length % block_length:
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}")
    b, lp = prompt.shape
    x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=prompt.dtype)], 1)
    rows = torch.arange(b)
    for end in range(lp + block_length, lp + gen_length + 1, block_length):
        for _ in range(block_length):                            # one commit per step
            probs = torch.softmax(model(x).float(), -1)          # (B, L, V)
            conf, tokens = probs.max(-1)                         # (B, L) each
            open_ = x == mask_id
            open_[:, end:] = False                               # nothing after the block
            pick = torch.where(open_, conf, -torch.inf).argmax(1)   # (B,)
            x[rows, pick] = tokens[rows, pick]
    return x[:, lp:]


def reply_text(tokenizer, ids: list[int], stop_ids: set[int]) -> str:
    """The generated ids up to the first EOT/EOS, as text."""
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(ids[:cut])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def evaluate(model: torch.nn.Module, tokenizer, examples: list[tasks.Example], gen_length: int,
             block_length: int, mask_id: int, stop_ids: set[int],
             batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy per task (and "mean" over tasks); batches rows of equal prompt length
    so no padding is needed."""
    groups: dict[int, list[tuple[tasks.Example, list[int]]]] = defaultdict(list)
    for ex in examples:
        ids = prompt_ids(tokenizer, ex.prompt)
        groups[len(ids)].append((ex, ids))
    right: dict[str, list[bool]] = defaultdict(list)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            out = decode(model, torch.tensor([ids for _, ids in chunk]), gen_length,
                         block_length, mask_id)
            for (ex, _), gen in zip(chunk, out.tolist()):
                right[ex.task].append(reply_text(tokenizer, gen, stop_ids) == ex.answer)
    acc = {t: sum(v) / len(v) for t, v in sorted(right.items(), key=lambda kv: list(tasks.TASKS).index(kv[0]))}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc


def format_table(results: dict[str, dict[str, float]]) -> str:
    """{setting: {task: acc}} -> a markdown table, one row per setting."""
    names = list(next(iter(results.values())))
    lines = ["| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for setting, acc in results.items():
        lines.append(f"| {setting} | " + " | ".join(f"{100 * acc[n]:.1f}" for n in names) + " |")
    return "\n".join(lines)
