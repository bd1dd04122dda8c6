"""Remasking policies: which of a step's candidates to commit. An explicit name -> function registry.

The second half of the step-level contract (docs/DESIGN.md):

    commit = POLICIES[params.policy](cand, quota, params, generator)   # (n,) bool

`cand` holds the n masked positions of one request's active block (in position order), `quota`
is the fixed schedule's count for this step (schedule.py for LLaDA, Dream's own rule in
dream.py; for `dream_origin` it is a probability). `SamplingParams.policy` names the entry. Every policy commits at least one position whenever n > 0, so a request always
progresses; threshold / factor / entropy-bound policies may commit more or fewer than `quota`.

A slot with confidence -inf is not a candidate. The engine never makes one; the reference loops
(llada_generate.py) pad the candidates to the official forward window with such no-op slots
(token = the current token), because `torch.topk` breaks ties by its internal layout: the
official code ranks a whole row, and only the same row reproduces which of several equally
confident positions it commits (fixture `llada.gen.b32.s32.lowconf.cfg1`, where CFG saturates
float32 probabilities to 1.0).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .candidates import Candidates
from .dream import DREAM_POLICIES
from .params import SamplingParams

Policy = Callable[[Candidates, int, SamplingParams, Optional[torch.Generator]], Tensor]


def top_k_mask(conf: Tensor, k: int) -> Tensor:
    """conf (n,) -> (n,) bool with the k highest confidences set (torch.topk, as the official code)."""
    commit = torch.zeros(conf.shape, dtype=torch.bool, device=conf.device)
    if k > 0:
        commit[torch.topk(conf, k).indices] = True
    return commit


def fixed(cand: Candidates, quota: int, params: SamplingParams,
          generator: Optional[torch.Generator] = None) -> Tensor:
    """ML-GSAI `generate` (low_confidence / random): the `quota` most confident positions.

    The official loop can schedule 0 for a step (steps per block > masks); that forward then
    commits nothing. Here at least one is committed (the contract); the reference loop
    reproduces the empty step by not calling the policy (llada_generate.py)."""
    return top_k_mask(cand.conf, min(max(int(quota), 1), len(cand)))


def threshold(cand: Candidates, quota: int, params: SamplingParams,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Fast-dLLM `get_transfer_index(threshold=...)`: every position with conf >= threshold,
    plus always the single most confident one (quota unused)."""
    commit = cand.conf >= params.threshold
    if len(cand):
        commit[torch.argmax(cand.conf)] = True
    return commit


def factor(cand: Candidates, quota: int, params: SamplingParams,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Fast-dLLM `get_transfer_index_dynamic(factor=f)` (quota unused).

    Sorted confidences c[0] >= c[1] >= ...; the j-th (0-based) passes while c[j] >= 1 - f/(j+2),
    the first always passes. k = index of the first failure (n-1 if none). Quirk kept: when the
    first failure is the last position (or there is none) k becomes n, so a failing last
    position is still committed; k = 0 (cannot happen for c >= 0) also becomes 1.
    """
    n = int((cand.conf > float("-inf")).sum())                   # real candidates
    if n == 0:
        return top_k_mask(cand.conf, 0)
    c = torch.sort(cand.conf, descending=True).values[:n]
    j = torch.arange(n, dtype=torch.float64, device=c.device)
    thr = 1.0 - params.factor / (j + 2.0)
    thr[0] = -1.0
    fails = torch.nonzero(c < thr).flatten()
    k = int(fails[0]) if len(fails) else n - 1
    if k == 0 or k == n - 1:
        k += 1
    return top_k_mask(cand.conf, k)


def entropy_bound(cand: Candidates, quota: int, params: SamplingParams,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """EB-sampler (Ben-Hamu et al. 2025): commit the lowest-entropy positions while their summed
    entropy stays <= params.entropy_bound (nats); always at least one (quota unused)."""
    n = len(cand)
    order = torch.sort(cand.entropy, stable=True).indices          # ascending entropy
    within = torch.cumsum(cand.entropy[order], dim=0) <= params.entropy_bound
    k = max(int(within.sum()), 1) if n else 0
    commit = torch.zeros(n, dtype=torch.bool, device=cand.entropy.device)
    commit[order[:k]] = True
    return commit


POLICIES: dict[str, Policy] = {
    "fixed": fixed,
    "threshold": threshold,
    "factor": factor,
    "entropy_bound": entropy_bound,
    **DREAM_POLICIES,     # dream_origin / dream_topk / dream_alg_temp / dream_threshold (dream.py)
}
