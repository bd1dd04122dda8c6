"""Held-out accuracy of a checkpoint with LLaDA's reference schedule, no engine needed.

`decode` is the LLaDA `generate` loop at temperature 0 with `low_confidence` remasking and one
token per step (REFERENCE_ALGORITHMS.md section 2): each step commits the masked position, up to
the current block's end, whose argmax token has the highest probability. The engine's own
policies are measured by benchmarks/quality.py; this loop is the trainer's yardstick.

SDAR (block-causal) models are decoded by their own reference loop instead,
`sampling.sdar_generate.block_diffusion_generate`, in the greedy form (top_k=1, so every draft
has confidence 1.0) with one commit per step scheduled (`denoising_steps` = block length), under
a named remasking strategy: `low_confidence_dynamic` then commits a whole block per forward,
`sequential` one position per forward, left to right.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..sampling.sdar_generate import BlockDiffusionParams, block_diffusion_generate
from . import tasks


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, gen_length: int, block_length: int,
           mask_id: int, logits_shift: bool = False) -> torch.Tensor:
    """prompt (B, Lp) int64, same length in every row -> generated ids (B, gen_length).
    logits_shift: logits[:, p-1] score position p (Dream's `diffusion_generate` shift)."""
    if gen_length % block_length:
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}")
    b, lp = prompt.shape
    x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=prompt.dtype)], 1)
    rows = torch.arange(b)
    for end in range(lp + block_length, lp + gen_length + 1, block_length):
        for _ in range(block_length):                            # one commit per step
            logits = model(x).float()                            # (B, L, V)
            if logits_shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            probs = torch.softmax(logits, -1)
            conf, tokens = probs.max(-1)                         # (B, L) each
            open_ = x == mask_id
            open_[:, end:] = False                               # nothing after the block
            pick = torch.where(open_, conf, -torch.inf).argmax(1)   # (B,)
            x[rows, pick] = tokens[rows, pick]
    return x[:, lp:]


@torch.no_grad()
def ar_decode(model: torch.nn.Module, prompt: torch.Tensor, gen_length: int) -> torch.Tensor:
    """Greedy next-token decoding of a causal model: prompt (B, Lp) -> (B, gen_length)."""
    x = prompt
    for _ in range(gen_length):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[:, prompt.shape[1]:]


@torch.no_grad()
def sdar_decode(model: torch.nn.Module, prompt: torch.Tensor, gen_length: int, block_length: int,
                stop_ids: set[int], strategy: str) -> torch.Tensor:
    """Each row of prompt (B, Lp) through the batch-1 reference loop -> (B, gen_length); blocks
    left masked after a stop come back as the mask id (`reply_text` cuts at the stop first)."""
    params = BlockDiffusionParams(gen_length=gen_length, block_length=block_length,
                                  denoising_steps=block_length, temperature=1.0, top_k=1,
                                  remasking_strategy=strategy,
                                  stopping_criteria_idx=tuple(sorted(stop_ids)))
    lp = prompt.shape[1]
    rows = [block_diffusion_generate(model, row[None], params, model.spec).x[0, lp:lp + gen_length]
            for row in prompt]
    return torch.stack(rows)


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
             batch_size: int = 64, logits_shift: bool = False, causal: bool = False,
             block_strategy: str | None = None) -> dict[str, float]:
    """Exact-match accuracy per task (and "mean" over tasks); batches rows of equal prompt length
    so no padding is needed. causal: a next-token model, decoded greedily (`ar_decode`).
    block_strategy: an SDAR model, decoded by `sdar_decode` with that remasking strategy."""
    groups: dict[int, list[tuple[tasks.Example, list[int]]]] = defaultdict(list)
    for ex in examples:
        ids = prompt_ids(tokenizer, ex.prompt)
        groups[len(ids)].append((ex, ids))
    right: dict[str, list[bool]] = defaultdict(list)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            prompt = torch.tensor([ids for _, ids in chunk])
            if block_strategy:
                out = sdar_decode(model, prompt, gen_length, block_length, stop_ids,
                                  block_strategy)
            elif causal:
                out = ar_decode(model, prompt, gen_length)
            else:
                out = decode(model, prompt, gen_length, block_length, mask_id, logits_shift)
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
