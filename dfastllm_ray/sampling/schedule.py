"""LLaDA's linear transfer schedule: how many masked positions each step of a block commits.

ML-GSAI/LLaDA `generate.get_num_transfer_tokens` (Fast-dLLM's vectorised rewrite gives the same
numbers). Under the linear noise schedule the expected number of tokens unmasked per step is
constant, so a block with `n` masks and `steps` steps commits `n // steps` per step and the first
`n % steps` steps take one extra.
"""
from __future__ import annotations

import torch
from torch import Tensor


def transfer_counts(n_masked: int, steps: int) -> list[int]:
    """One request: `n_masked` masks over `steps` steps -> per-step counts (len == steps).

    A count is 0 when steps > n_masked (the official loop still runs those forwards)."""
    if steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: must be >= 1")
    base, rem = divmod(int(n_masked), steps)
    return [base + 1] * rem + [base] * (steps - rem)


def get_num_transfer_tokens(block_mask_index: Tensor, steps: int) -> Tensor:
    """block_mask_index (B, block_length) bool -> (B, steps) int64 per-row step counts."""
    counts = [transfer_counts(n, steps) for n in block_mask_index.sum(dim=1).tolist()]
    return torch.tensor(counts, dtype=torch.int64, device=block_mask_index.device).reshape(-1, steps)
