"""The step's decisions: per request `propose` + the request's policy (docs/DESIGN.md).

Each request decides from its own logits rows, its own knobs and its own `torch.Generator`, so
a request's tokens do not depend on what else is in the batch. The decisions of all requests
are copied to the host together: one device sync per step, not one per request.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..models.spec import ModelSpec
from ..sampling.candidates import Candidates
from ..sampling.dream import DREAM_POLICIES, propose_dream, sample_tokens
from ..sampling.params import SamplingParams
from ..sampling.policies import POLICIES
from ..sampling.propose import propose
from .kv_pool import to_device
from .outputs import CACHED, ScheduledRequest
from .request import Request

# Policies whose quota is a count the schedule may set to 0: that step's forward commits nothing
# (ML-GSAI's empty steps, the hub's `if k > 0`, Dream's cached forward past the schedule).
QUOTA_POLICIES = ("fixed", "dream_topk", "dream_alg_temp", "dream_threshold")


def step_params(req: Request, item: ScheduledRequest) -> SamplingParams:
    """Fast-dLLM's cached Dream steps score by negative entropy whatever `alg` says (unless the
    threshold rule is on): `generation_utils_block` hard-codes it."""
    p = req.params
    if item.kind == CACHED and p.alg is not None and p.threshold is None:
        return replace(p, alg="entropy")
    return p


def decide(logits: Tensor, item: ScheduledRequest, req: Request, spec: ModelSpec,
           window_index: Tensor) -> tuple[Tensor, Tensor]:
    """logits (n, V) at item.candidates -> (commit (n,) bool, tokens (n,) int64) on the device.
    window_index (n,): the candidates' rows in the forward window (item.candidates - q_start)."""
    n, gen = len(item.candidates), req.generator
    p = step_params(req, item)
    none = torch.zeros(n, dtype=torch.bool, device=logits.device)
    if item.force_position is not None:
        # Fast-dLLM Dream refresh: the block's first position takes sample_tokens' x0, nothing else
        _, x0 = sample_tokens(logits, p.temperature, p.top_p, p.top_k, generator=gen)
        none[item.candidates.index(item.force_position)] = True
        return none, x0
    name = p.policy
    if name == "dream_origin":
        return _origin(logits, item.quota, p, gen)
    if name in QUOTA_POLICIES and item.quota == 0:
        return none, torch.zeros(n, dtype=torch.long, device=logits.device)
    cand = propose(logits, p, gen, spec=spec)
    policy = POLICIES.get(name) or DREAM_POLICIES[name]
    return _window_select(cand, item, p, gen, policy, window_index), cand.tokens


def _window_select(cand: Candidates, item: ScheduledRequest, p: SamplingParams, gen,
                   policy, idx: Tensor) -> Tensor:
    """Run the policy over the whole forward window, -inf confidence (+inf entropy) where a
    position may not commit, as the official codes lay out a row (`where(mask_index, x0_p, -inf)`,
    Dream's `full_confidence`): `torch.topk` then breaks ties, and `torch.multinomial` consumes
    the RNG, exactly as the references do. Returns the commit mask over the candidates."""
    dev = cand.tokens.device
    conf = torch.full((item.q_len,), float("-inf"), dtype=torch.float64, device=dev)
    conf[idx] = cand.conf.to(dev)

    def window_entropy() -> Tensor:              # only the entropy-bound policy reads it
        ent = torch.full((item.q_len,), float("inf"), dtype=torch.float64, device=dev)
        ent[idx] = cand.entropy.to(dev)
        return ent

    window = Candidates(torch.zeros(item.q_len, dtype=torch.long, device=dev), conf,
                        window_entropy)
    return policy(window, item.quota, p, gen)[idx]


def _origin(logits: Tensor, prob: float, p: SamplingParams, gen) -> tuple[Tensor, Tensor]:
    """Dream `origin`: coin flips first (`rand(n) < p`), then tokens for the flipped rows only,
    the hub's draw order, so a seeded request reproduces the seeded reference."""
    n = logits.shape[0]
    blank = Candidates(torch.zeros(n, dtype=torch.long, device=logits.device),
                       torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    flips = DREAM_POLICIES["dream_origin"](blank, prob, p, gen)
    tokens = torch.zeros(n, dtype=torch.long, device=logits.device)
    if bool(flips.any()):
        tokens[flips] = propose_dream(logits[flips], p, gen).tokens
    return flips, tokens


def sample(items: list[ScheduledRequest], requests: dict[str, Request],
           logits: dict[str, Tensor], spec: ModelSpec) -> dict[str, tuple[list[int], list[int]]]:
    """Per scheduled request: (committed canvas positions, committed tokens) as host lists."""
    out = {item.request_id: ([], []) for item in items}
    live = [item for item in items if item.candidates]
    if not live:
        return out
    rows = to_device(torch.tensor([c - i.q_start for i in live for c in i.candidates]),
                     logits[live[0].request_id].device)      # one host -> device copy per step
    decisions, at = [], 0
    for item in live:
        n = len(item.candidates)
        c, t = decide(logits[item.request_id], item, requests[item.request_id], spec,
                      rows[at:at + n])
        decisions.append(torch.stack((c.to(torch.long), t)))      # (2, n)
        at += n
    flat_commit, flat_tokens = torch.cat(decisions, dim=1).cpu().tolist()   # the one host copy
    at = 0
    for item in live:
        n = len(item.candidates)
        pos = [p for p, c in zip(item.candidates, flat_commit[at:at + n]) if c]
        tok = [t for t, c in zip(flat_tokens[at:at + n], flat_commit[at:at + n]) if c]
        out[item.request_id] = (pos, tok)
        at += n
    return out
