"""WINO, wide-in narrow-out (Hong et al. 2025, `Feng-Hong/WINO-DLLM` `LLaDA/decoding.py`
`decoding_wino`): commit generously, then re-check what was committed and revoke (re-mask) it.

Each step of the active block:
- *wide in*: every masked slot with confidence > `threshold` (0.6) commits, at most
  max_accept = min(max(int(0.7 * masked), 5), 20) of them (the most confident), and always at
  least the single most confident one;
- *narrow out*: when more than one slot committed this step, every slot committed at an earlier
  step of the block whose re-check probability is < `revoke_threshold` (0.9) is re-masked, the
  least sure first, at most (this step's commits - 1) of them.

The re-check probability of a committed position is what the model gives its committed token
when it cannot see it: WINO appends a *shadow* copy of the block (all masks, same RoPE positions)
whose row j attends to the whole canvas except block position j, and to the shadow; no canvas
row attends to the shadow (`shadow_bias`). A block is final when it has no masks left; only then
may its tokens be streamed.

One change from the official code, for a termination guarantee: the official narrow-out caps the
revocations at (the *previous* step's commits - 1); here the cap is this step's commits - 1, so
every step commits at least one position net and a block of n positions ends within n steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .batch import RowKnobs
from .batch_policies import ranks_of

WINO_THRESHOLD = 0.6        # wide-in (`threshold`), when the request's threshold is unset
WINO_REVOKE = 0.9           # narrow-out (`threshold_back`)
ACCEPT_SHARE, ACCEPT_MIN, ACCEPT_MAX = 0.7, 5, 20


def wino(conf: Tensor, knobs: RowKnobs, ranked, is_masked: Tensor, current_conf: Tensor,
         revoke_threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Every row of a group at once -> (commit (B, n) bool, revoke (B, n) bool).

    conf (B, n): the proposal's confidence at each slot (read at masked slots only);
    is_masked (B, n) bool: the slot is a mask (else committed earlier in this block, revocable);
    current_conf (B, n): the re-check probability of the committed token (read at committed
    slots only); revoke_threshold (B,). `knobs.valid` marks real slots; `ranked` is unused (the
    ranks here are over masked slots only). Thresholds compare in float64, as the official
    float64 softmax against a Python float."""
    valid = knobs.valid
    masked = valid & is_masked
    wide = torch.where(masked, conf, float("-inf"))
    rank = ranks_of(torch.sort(wide, dim=-1, descending=True, stable=True).indices)
    n_masked = masked.sum(-1, keepdim=True)                                 # (B, 1)
    cap = (n_masked.to(torch.float64) * ACCEPT_SHARE).long().clamp(ACCEPT_MIN, ACCEPT_MAX)
    thr = knobs.threshold
    thr = torch.where(torch.isnan(thr), WINO_THRESHOLD, thr)[:, None]          # float64
    commit = masked & (((wide.to(thr.dtype) > thr) & (rank < cap)) | (rank == 0))
    accepted = commit.sum(-1, keepdim=True)                                 # (B, 1)
    held = valid & ~is_masked
    back = torch.where(held, current_conf, float("inf"))
    weak = held & (back.to(torch.float64) < revoke_threshold[:, None].to(torch.float64))
    back_rank = ranks_of(torch.sort(back, dim=-1, stable=True).indices)     # least sure first
    revoke = weak & (back_rank < accepted - 1)
    return commit, revoke


def shadow_bias(length: int, s: int, e: int, dtype=torch.float32, device=None) -> Tensor:
    """Additive attention bias (1, 1, L + n, L + n) for a canvas of `length` plus a shadow of the
    block [s, e) (n = e - s) appended after it: canvas rows see the canvas only; shadow row j sees
    the canvas except position s + j, and the whole shadow (the official WINO mask)."""
    n = e - s
    allowed = torch.zeros(length + n, length + n, dtype=torch.bool, device=device)
    allowed[:length, :length] = True
    allowed[length:, :length] = True
    allowed[length:, length:] = True
    j = torch.arange(n, device=device)
    allowed[length + j, s + j] = False
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
