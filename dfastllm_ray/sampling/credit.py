"""dInfer's credit fusion (inclusionAI/dInfer `parallel_strategy.py`,
`CreditThresholdParallelDecoder`), with a bounded state.

Each step, every masked position of the active block credits its current top-1 token:
credit <- decay_beta * credit, then credit[top-1] += p_top1 ** boost_gamma; the logits the
threshold rule sees are `logits + credit_alpha * log(1 + credit)`, so a token that stayed on top
for several steps gains confidence and commits sooner. Defaults: alpha 0.7, gamma 0.2, beta 0.8;
the threshold rule's 0.9.

dInfer keeps the credit as a dense positions x vocabulary float32 matrix per block. Only tokens
that were top-1 at some step are ever non-zero, so here each position keeps K = 4 (token, credit)
pairs:

    CreditState.ids     (B, n, K) int64    credited tokens per slot
    CreditState.credit  (B, n, K) float32  their credit (0 = free pair)

A token already held is credited in place; a new one takes the pair with the least credit.
With at most K distinct top-1 tokens per position in a block (K >= the block's steps suffices)
this equals the dense matrix exactly (tests/test_credit.py); beyond, the least-credited token's
boost is dropped. Slots are the block's positions in order; the state resets when a block opens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CREDIT_ALPHA, BOOST_GAMMA, DECAY_BETA = 0.7, 0.2, 0.8
CREDIT_THRESHOLD = 0.9        # the threshold rule's default when the request sets none
CREDIT_K = 4


@dataclass
class CreditState:
    ids: Tensor         # (B, n, K) int64
    credit: Tensor      # (B, n, K) float32

    @classmethod
    def empty(cls, b: int, n: int, k: int = CREDIT_K, device=None) -> "CreditState":
        return cls(torch.zeros(b, n, k, dtype=torch.long, device=device),
                   torch.zeros(b, n, k, dtype=torch.float32, device=device))


def credit_update(logits: Tensor, masked: Tensor, state: CreditState,
                  gamma: float = BOOST_GAMMA, beta: float = DECAY_BETA) -> CreditState:
    """logits (B, n, V) of this step, masked (B, n) bool -> the state after this step's credit."""
    probs = F.softmax(logits.to(torch.float32), dim=-1)
    top_p, top = probs.max(dim=-1)                                          # (B, n)
    boost = top_p.pow(gamma) * masked.to(top_p.dtype)
    credit = state.credit * beta
    held = (state.ids == top[..., None]) & (credit > 0)                     # (B, n, K)
    free = torch.where(credit > 0, credit, -1.0).argmin(-1, keepdim=True)   # least credit / free
    slot = torch.where(held.any(-1, keepdim=True), held.to(torch.int8).argmax(-1, keepdim=True),
                       free)
    add = masked[..., None] & (boost[..., None] > 0)
    new_ids = torch.where(add & ~held.any(-1, keepdim=True),
                          state.ids.scatter(-1, slot, top[..., None]), state.ids)
    kept = torch.where(add & ~held.any(-1, keepdim=True),
                       credit.scatter(-1, slot, torch.zeros_like(boost[..., None])), credit)
    return CreditState(new_ids, kept.scatter_add(-1, slot, (boost * masked)[..., None]))


def credit_fuse(logits: Tensor, state: CreditState, alpha: float = CREDIT_ALPHA) -> Tensor:
    """logits (B, n, V) + alpha * log(1 + credit) at the credited tokens."""
    bonus = alpha * torch.log1p(state.credit).to(logits.dtype)
    return logits.scatter_add(-1, state.ids, torch.where(state.credit > 0, bonus, 0.0))


def dense_credit(logits: Tensor, masked: Tensor, mat: Tensor, gamma: float = BOOST_GAMMA,
                 beta: float = DECAY_BETA, alpha: float = CREDIT_ALPHA) -> tuple[Tensor, Tensor]:
    """The official dense rule, (B, n, V) matrix -> (fused logits, new matrix) (tests only)."""
    probs = F.softmax(logits.to(torch.float32), dim=-1)
    top_p, top = probs.max(dim=-1)
    mat = (mat * beta).scatter_add(-1, top[..., None],
                                   (top_p.pow(gamma) * masked.to(top_p.dtype))[..., None])
    return logits + alpha * torch.log(mat + 1), mat
