"""Dream's step functions: the logit shift, `sample_tokens`, the time schedule, the selection rules.

Follows the hub `Dream-org/Dream-v0-Instruct-7B/generation_utils.py` (`top_p_logits`,
`top_k_logits`, `sample_tokens`, `DreamGenerationMixin._sample`) and Fast-dLLM v1's Dream
`confidence_threshold` alg (`v1/dream/model/generation_utils.py`); REFERENCE_ALGORITHMS.md
sections 5-6 describe both. Everything here is a pure function over tensors:

    cand = propose_dream(logits, params, generator)          # logits (n, V), already shifted
    commit = select_topk(cand, dream_quota(m, i, steps, eps), params, generator)   # (n,) bool

Dream's numbers are float32 in the official code (softmax, confidences, the schedule `t` and the
quota product); they are kept float32 until the end so truncations and ties land where the
official ones do. `Candidates.conf` is float64 by contract: the float32 values converted exactly.
Draws take an optional `torch.Generator`; None draws from the global RNG, in the official order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .candidates import Candidates
from .params import SamplingParams

NEG_ENTROPY_EPS = 1e-10          # sample_tokens: log(p + 1e-10)
Number = Union[int, float, Tensor]


def shift_logits(logits: Tensor) -> Tensor:
    """(B, L, V) raw -> (B, L, V) where row p is the model's guess for token p (Dream's shift).

    The output at p-1 predicts p; the first row keeps its own output (`cat([l[:, :1], l[:, :-1]])`,
    hub `_sample`). Fast-dLLM applies it inside each cached window, so the window's first row
    keeps its own output there too.
    """
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def top_p_logits(logits: Tensor, top_p: float) -> Tensor:
    """(n, V) -> (n, V): drop the tail past cumulative probability top_p (fill finfo.min).

    The removal mask is shifted right by one, so the token whose cumulative probability first
    crosses top_p is kept (hub `top_p_logits`)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: Tensor, top_k: int) -> Tensor:
    """(n, V) -> (n, V): keep logits >= the k-th largest (ties at the k-th all stay)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def filtered_probs(logits: Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                   top_k: Optional[int] = None) -> Tensor:
    """(n, V) -> (n, V) probabilities after temperature, top_p then top_k (hub order).

    The softmax comes AFTER the filters, so Dream's confidences are renormalised over the kept set.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    return torch.softmax(logits, dim=-1)


def categorical(probs: Tensor, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """(n, V) -> (n,) int64, the same draw as `torch.distributions.Categorical(probs).sample()`.

    Categorical renormalises and calls `multinomial(probs_2d, 1, replacement=True)`; unlike it,
    this takes a generator. The hub falls back to argmax when Categorical's simplex check rejects
    the renormalised `probs` (NaN, or a sum off by 1e-6); callers see that as `None`."""
    p = probs / probs.sum(-1, keepdim=True)
    if not bool(((p >= 0).all(-1) & ((p.sum(-1) - 1).abs() < 1e-6)).all()):
        return None
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, True, generator=generator)[:, 0]


def sample_tokens(logits: Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                  top_k: Optional[int] = None, margin_confidence: bool = False,
                  neg_entropy: bool = False, generator: Optional[torch.Generator] = None,
                  ) -> tuple[Tensor, Tensor]:
    """hub `sample_tokens`: logits (n, V) -> (confidence (n,) float32, x0 (n,) int64).

    x0 is a Categorical draw when temperature > 0, else the argmax; the confidence is its
    (renormalised) probability, or top1 - top2 (margin), or sum p log(p + 1e-10) (neg_entropy,
    higher = more certain). Margin and neg-entropy still take x0 from the draw / argmax.
    """
    probs = filtered_probs(logits, temperature, top_p, top_k)
    return _confidence(probs, temperature, margin_confidence, neg_entropy, generator)


def _confidence(probs: Tensor, temperature: float, margin: bool, neg_entropy: bool,
                generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    x0 = categorical(probs, generator) if temperature > 0 and probs.shape[0] else None
    if x0 is None:
        conf, x0 = probs.max(dim=-1)
    else:
        conf = probs.gather(-1, x0[:, None])[:, 0]
    if margin:
        top2 = torch.sort(probs, dim=-1, descending=True).values[:, :2]
        conf = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        conf = _neg_entropy(probs)
    return conf, x0


def _neg_entropy(probs: Tensor) -> Tensor:
    return torch.sum(probs * torch.log(probs + NEG_ENTROPY_EPS), dim=-1)


def confidence_alg(params: SamplingParams) -> str:
    """Which `sample_tokens` confidence a request uses. With `threshold` set, Dream follows
    Fast-dLLM's `alg='confidence_threshold'`: the token probability, whatever `alg` says."""
    return "maskgit_plus" if params.threshold is not None else (params.alg or "maskgit_plus")


def propose_dream(logits: Tensor, params: SamplingParams,
                  generator: Optional[torch.Generator] = None) -> Candidates:
    """logits (n, V) at the masked positions, already shifted -> Candidates of length n.

    conf by `confidence_alg(params)`: maskgit_plus / origin = the token's probability,
    topk_margin = top1 - top2, entropy = negative entropy; entropy = -sum p log(p + 1e-10) of the
    filtered distribution, in nats.
    """
    alg = confidence_alg(params)
    probs = filtered_probs(logits, params.temperature, params.top_p, params.top_k)
    conf, x0 = _confidence(probs, params.temperature, alg == "topk_margin", alg == "entropy",
                           generator)
    return Candidates(x0, conf.to(torch.float64), (-_neg_entropy(probs)).to(torch.float64))


def dream_transfer_prob(step: int, steps: int, eps: float) -> Tensor:
    """Fraction of the remaining masks step `step` unmasks: 1 - t[i+1]/t[i] (float32, 0-d) with
    t = linspace(1, eps, steps + 1); exactly 1 on the last step."""
    return torch.tensor(transfer_probs(steps, eps)[min(step, steps - 1)])


@lru_cache(maxsize=256)
def transfer_probs(steps: int, eps: float) -> tuple[np.float32, ...]:
    """Every step's 1 - t[i+1]/t[i] of one schedule, computed once with torch's float32
    linspace (the engine plans each step on the host with no torch op)."""
    t = torch.linspace(1, eps, steps + 1)
    probs = (1 - t[1:steps] / t[:steps - 1]).tolist()        # float32 values, exact in float
    return tuple(np.float32(v) for v in probs) + (np.float32(1.0),)


def dream_quota(masked_count: Number, step: int, steps: int, eps: float) -> int:
    """int(m * (1 - t[i+1]/t[i])), int(m) on the last step (hub `_sample`).

    m may be fractional: the hub uses the batch MEAN of the masked counts, the same k for every
    row. Float32 product (numpy's float32 is the same IEEE operation), then truncation: 32 masks
    over 32 steps commit 0 at step 0, 2 at the end.
    """
    m = np.float32(float(masked_count))
    if step >= steps - 1:
        return int(m)
    return int(m * transfer_probs(steps, eps)[step])


def _none(cand: Candidates) -> Tensor:
    return torch.zeros(len(cand), dtype=torch.bool, device=cand.tokens.device)


def select_origin(cand: Candidates, quota: Number, params: SamplingParams,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """alg='origin': each candidate is unmasked with probability `quota` = dream_transfer_prob.

    Here the quota is a PROBABILITY, not a count: one float32 `rand(n) < p` coin per position,
    drawn even at temperature 0. It may commit none (the last step's p = 1 commits all). The hub
    flips the coins BEFORE sampling tokens, and only for the flipped positions; the reference loop
    keeps that order (dream_generate.py)."""
    u = torch.rand(len(cand), generator=generator, device=cand.tokens.device)
    return u < quota


def _quota_k(cand: Candidates, quota: Number) -> int:
    return min(max(int(quota), 1), len(cand))


def select_topk(cand: Candidates, quota: Number, params: SamplingParams,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """maskgit_plus / topk_margin / entropy without alg_temp: the `quota` most confident.

    The hub skips the step when the quota is 0; here at least one is committed (the contract),
    and the reference loop reproduces the empty step by not calling the policy."""
    commit = _none(cand)
    if len(cand):
        commit[torch.topk(cand.conf, _quota_k(cand, quota)).indices] = True
    return commit


def select_alg_temp(cand: Candidates, quota: Number, params: SamplingParams,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """alg_temp > 0: `quota` positions drawn without replacement from softmax(conf / alg_temp).

    float32 like the hub's `full_confidence`. The hub draws over the whole canvas row (-inf, so
    probability 0, where not masked); multinomial draws one exponential per entry, so the
    reference loop passes candidates over that row to consume the RNG identically."""
    commit = _none(cand)
    if len(cand):
        p = F.softmax(cand.conf.to(torch.float32) / params.alg_temp, dim=-1)
        commit[torch.multinomial(p, _quota_k(cand, quota), generator=generator)] = True
    return commit


def select_confidence_threshold(cand: Candidates, quota: Number, params: SamplingParams,
                                generator: Optional[torch.Generator] = None) -> Tensor:
    """Fast-dLLM Dream `confidence_threshold`: of the `quota` most confident, keep the first and
    every other one whose confidence is not below `threshold`.

    The comparison is float32 (the official `float32_tensor < python_float`). Dropped positions
    go back into the next step's quota (`ThresholdCarry`); quota here is that sum."""
    commit = _none(cand)
    if len(cand):
        values, idx = torch.topk(cand.conf, _quota_k(cand, quota))
        keep = ~(values.to(torch.float32) < params.threshold)
        keep[0] = True
        commit[idx[keep]] = True
    return commit


@dataclass
class ThresholdCarry:
    """Fast-dLLM Dream no-cache `confidence_threshold` schedule for one request.

    Each step offers `per_step` = masks // steps plus the positions dropped the step before. Drops
    on the last step set `per_step` to 0 and add ONE step (the official loop bumps `steps` at the
    first drop, after which `i < steps - 1` holds for the others), which then offers every
    remaining mask. The threshold can only delay tokens relative to the linear schedule.
    """
    per_step: int           # tokens offered per step (0 once the run is extended)
    steps: int              # steps to run; grows when the last step drops tokens
    carry: int = 0          # positions dropped by the previous step

    def quota(self) -> int:
        return self.per_step + self.carry

    def update(self, step: int, offered: int, committed: int) -> None:
        """After step `step` offered `offered` positions and committed `committed` of them."""
        self.carry = offered - committed
        if self.carry and step == self.steps - 1:
            self.per_step = 0
            self.steps += 1


def dream_policy(params: SamplingParams) -> str:
    """The Dream selection rule a request uses: a key for `POLICIES` (policies.py)."""
    if params.threshold is not None:
        return "dream_threshold"
    if params.alg == "origin":
        return "dream_origin"
    return "dream_alg_temp" if params.alg_temp else "dream_topk"


DREAM_POLICIES = {
    "dream_origin": select_origin,
    "dream_topk": select_topk,
    "dream_alg_temp": select_alg_temp,
    "dream_threshold": select_confidence_threshold,
}
