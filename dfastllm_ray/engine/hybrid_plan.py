"""Host side of hybrid diffusion-AR requests (APD, speculative drafting): windows and counters.

A hybrid request commits strictly left to right: `curr` is its first masked position. Each
step is one drafter forward over a window of the canvas and one verifier forward over the new
tokens (engine/hybrid.py); the host plans the windows from counters and advances them with the
committed count the step's single copy brings back.

- APD (`apd_generate`, REFERENCE_ALGORITHMS.md section 8): the drafter computes canvas rows
  [left, right) = `sampling.apd.apd_window` (right = curr + M, left > 0 only with the drafter's
  cache: the Dream config's `use_cache` and `kv_window`), drafts every masked row, and commits
  the leading run the mixture target accepts (the first always).
- Speculative: the drafter sees committed + k masks (rows [0, curr + k)), the verifier checks
  the k drafts; accepted + 1 tokens commit. k adapts (`next_draft_length`).

The verifier's exact cache holds canvas positions [0, v_len): APD keeps every committed token
(and the verifier's logits for the next position, on the device), speculative all but the last.
"""
from __future__ import annotations

from ..sampling.apd import APDParams, apd_window
from ..sampling.params import APD_MIXTURE_WEIGHT, DRAFT_TOKENS
from ..sampling.speculative import next_draft_length
from .outputs import HYBRID, ScheduledRequest
from .request import Request


def apd_params(req: Request, drafter_cache: bool) -> APDParams:
    p = req.params
    return APDParams(max_new_tokens=p.max_tokens, kv_window=p.kv_window,
                     apd_mixture_weight=(APD_MIXTURE_WEIGHT if p.apd_mixture_weight is None
                                         else p.apd_mixture_weight),
                     max_lookahead=p.max_lookahead, temperature=p.temperature, top_p=p.top_p,
                     top_k=p.top_k, diffusion_cache=drafter_cache)


def plan_hybrid(req: Request, drafter_cache: bool) -> ScheduledRequest:
    """The drafter window, the draft positions and the verifier's new rows of the next step."""
    p, length, curr = req.params, req.canvas_len, req.curr
    if p.decoding == "apd":
        cached = drafter_cache and p.kv_window is not None and req.nfe > 0
        left, right = apd_window(curr, length, apd_params(req, drafter_cache), req.prev_accept,
                                 cached)
        v_start = 0 if req.v_len == 0 else curr
        quota = (APD_MIXTURE_WEIGHT if p.apd_mixture_weight is None else p.apd_mixture_weight)
    else:
        left, right = 0, curr + min(req.draft_k, length - curr)
        v_start, quota = req.v_len, 0.0
    return ScheduledRequest(
        request_id=req.request_id, kind=HYBRID, q_start=left, q_len=right - left, kv_len=right,
        cand_start=curr, cand_end=right, num_candidates=right - curr, quota=quota, k=0,
        policy=group_policy(req), schedule_step=req.block_step, schedule_len=1, slot=req.slot,
        v_start=v_start)


def group_policy(req: Request) -> str:
    """The hybrid group a request's step joins: "speculative", "apd", or "apd_cached" (a drafter
    forward against its KV pages: the Dream config's use_cache with kv_window)."""
    p = req.params
    if p.decoding == "apd" and req.drafter_cache and p.kv_window is not None:
        return "apd_cached"
    return p.decoding


def after_hybrid_step(req: Request, item: ScheduledRequest, committed: int) -> None:
    """Advance the counters by the step's committed tokens."""
    n_draft = item.cand_end - item.cand_start
    req.curr += committed
    req.prev_accept = committed
    req.verifier_forwards += 1
    if req.params.decoding == "apd":
        req.v_len = req.curr
    else:                                # the cache holds every committed token but the last
        req.v_len = req.curr - 1
        accepted = committed - 1
        req.draft_k = next_draft_length(n_draft, accepted, req.params.draft_tokens or DRAFT_TOKENS)


def start_hybrid(req: Request) -> None:
    """Counters of a hybrid request at admission."""
    req.curr = req.prompt_len
    req.draft_k = req.params.draft_tokens or DRAFT_TOKENS
