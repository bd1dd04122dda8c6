"""What one request does in its next step, and when its active block is done (host side).

The reference loops' control flow, one step at a time, so the engine can interleave many
requests (REFERENCE_ALGORITHMS.md 2, 3, 5, 6; `sampling/llada_generate.py`, `dream_generate.py`):

- kv_cache_mode "none" (ML-GSAI `generate`, Fast-dLLM `generate`, Dream `diffusion_generate`):
  every step is a full-canvas forward and every masked position before the block end competes.
  Dream decodes the whole generation as one block here, as `diffusion_generate` does.
- "prefix" / "dual" (Fast-dLLM `generate_with_prefix_cache` / `_dual_cache` and Dream's
  `generation_utils_block`): a block's first step is a full *refresh* forward writing the
  canvas K/V to the request's pages (LLaDA: every mask before the block end competes; Dream:
  the block's first position takes the argmax, nothing else); later steps query the block
  (dual) or the block and everything after it (prefix), and only the block's masks compete.

A block ends when it has no masks left, or when its schedule is spent: a fixed LLaDA schedule
after steps_per_block forwards (ML-GSAI runs exactly that many; the engine skips the trailing
forwards of a block with no masks left, which commit nothing), dual mode always there (Fast-dLLM's
bounded loop, so a threshold run can leave masks, as the reference does), Dream's cached time
schedule after the forward at i == steps_per_block (which commits nothing, as the reference).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Collection, Sequence

from ..sampling.dream import ThresholdCarry, transfer_probs, dream_quota
from ..sampling.schedule import transfer_counts
from .outputs import CACHED, FULL, PREFILL, REFRESH, ScheduledRequest
from . import block_plan
from .block_plan import BLOCK
from .hybrid_plan import plan_hybrid
from .request import Request

REVOCABLE = ("wino",)                  # policies that may re-mask committed block positions
UNBOUNDED = ("wino", "klass")          # blocks that run until no mask is left (not the schedule)
# Policies whose quota is a count the schedule may set to 0: that step's forward commits nothing.
QUOTA_POLICIES = ("fixed", "dream_topk", "dream_alg_temp", "dream_threshold", "pc_sampler",
                  "sched_exit", "dus")
# LLaDA policies on the fixed schedule: a block ends after steps_per_block forwards, as `fixed`
# (PC-Sampler reorders the schedule's commits; SchED's exit only ends a block sooner).
SCHEDULED_POLICIES = ("fixed", "pc_sampler", "sched_exit", "dus")


def is_dream(req: Request) -> bool:
    """Dream's schedules and selection rules apply when `alg` is set (the engine sets it for Dream)."""
    return req.params.alg is not None


def open_block(req: Request, mode: str) -> None:
    """Reset the per-block counters of the newly active block (its positions are all masked:
    no step ever commits past the active block's end)."""
    if mode == BLOCK:
        block_plan.open_block(req)
        return
    req.block_step = 0
    req.refresh_from = 0
    p = req.params
    if not is_dream(req):    # LLaDA: the linear schedule over the block's masks
        req.block_quota = transfer_counts(req.masked_block, req.steps_per_block)
    elif mode == "none" and p.threshold is not None:   # Fast-dLLM Dream confidence_threshold
        req.carry = ThresholdCarry(req.masked_upto_block_end // p.steps, p.steps)


def next_block(req: Request) -> None:
    """Move the counters to the next block: its leftovers join the masks before it."""
    req.block_idx += 1
    req.masked_before += req.masked_block
    req.masked_block = req.params.block_length


def plan(req: Request, mode: str, refresh: str = "full") -> ScheduledRequest:
    """The forward window, candidates and quota of `req`'s next step."""
    if req.params.is_hybrid:
        return plan_hybrid(req, req.drafter_cache)
    if mode == BLOCK:
        return block_plan.plan_block(req)
    length, s, e = req.canvas_len, req.block_start, req.block_end
    if mode == "none":
        kind, q_start, q_len = FULL, 0, length
    elif req.block_step == 0 or refresh_due(req):
        kind, q_start = REFRESH, refresh_start(req, refresh)
        q_len = refresh_end(req, mode) - q_start
    else:
        kind, q_start = CACHED, s
        q_len = length - s if mode == "prefix" else e - s
    item = ScheduledRequest(request_id=req.request_id, kind=kind, q_start=q_start, q_len=q_len,
                            kv_len=length, cand_start=s, cand_end=e, num_candidates=0, quota=0,
                            k=0, policy="", schedule_step=req.block_step,
                            schedule_len=req.steps_per_block, slot=req.slot)
    mid_refresh = kind == REFRESH and req.block_step > 0
    if kind == REFRESH and is_dream(req) and not mid_refresh:
        item.num_candidates, item.quota, item.k, item.force_position = 1, 1, 1, s
        item.policy, item.conf_alg = "force", req.params.alg
        return item
    # full / refresh forwards: every mask from the window start to the block end competes
    # (prompt masks, leftovers of earlier blocks; frozen prompt pages hold none); cached steps,
    # incremental and chunked refreshes: the block's masks only
    if req.params.policy in REVOCABLE:   # WINO: every block position (masked or revocable)
        item.num_candidates = req.params.block_length
    elif req.params.policy in UNBOUNDED:  # KLASS: the block's masks (its state is per block slot)
        item.num_candidates = req.masked_block
    elif kind == CACHED or q_start > frozen_start(req) or mid_refresh:
        item.num_candidates = req.masked_block        # (a mid-block refresh decodes as cached)
    else:
        item.cand_start, item.num_candidates = q_start, req.masked_upto_block_end
    item.quota = quota(req, mode, item.num_candidates)
    item.policy, item.conf_alg = step_policy(req, CACHED if mid_refresh else kind)
    item.k = commit_count(item.policy, item.quota, item.num_candidates)
    return item


def refresh_due(req: Request) -> bool:
    """A mid-block refresh (`refresh_every` N): the block's step N, 2N, ... recomputes the window
    a block's first forward does, so the prompt's and committed tokens' K/V stop reflecting the
    all-masked block the first refresh saw; `refresh_on: "content"`, the step after one that
    committed a non-EOS token. It decodes like a cached step (block masks only, the cached
    policy) and writes the K/V of its window again."""
    return req.block_step > 0 and (every_due(req) or content_due(req))


def every_due(req: Request) -> bool:
    """`refresh_every` N: this is the block's step N, 2N, ..."""
    n = req.params.refresh_every
    return bool(n) and req.block_step % n == 0


def content_due(req: Request) -> bool:
    """`refresh_on: "content"`: the last step committed a non-EOS token, and the request has
    content refreshes left (`refresh_budget`, per request; None: no bound)."""
    budget = req.params.refresh_budget
    return req.content_committed and (budget is None or req.content_refreshes < budget)


def content_only(req: Request) -> bool:
    """This mid-block refresh is due to `refresh_on: "content"` alone (not `refresh_every`)."""
    return content_due(req) and not every_due(req)


def refresh_end(req: Request, mode: str) -> int:
    """Where a refresh window ends: the canvas end, except a dual-cache content refresh, which
    stops at the block end. The later blocks are still all masks and the cached steps never
    query them; their keys were written at the block's first step (measured: leaving them costs
    nothing, docs/policies.md) and writing them again would double the window."""
    if mode == "dual" and req.block_step > 0 and content_only(req):
        return req.block_end
    return req.canvas_len


def committed_content(req: Request, new: Sequence[int], lo: int, hi: int,
                      stop_ids: Collection[int]) -> bool:
    """Did this step commit a token other than EOS/EOT (a mask turned into content) in the
    generation positions [lo, hi)? `new` is the step's snapshot, `req.generated` the last one:
    both on the host (the step's one device -> host copy), so this never syncs."""
    lo = max(lo, 0)
    now = _ints(new[lo:hi])
    before = [req.mask_token_id] * len(now) if req.generated is None else _ints(req.generated[lo:hi])
    return any(t != b and t != req.mask_token_id and t not in stop_ids
               for t, b in zip(now, before))


def _ints(span) -> list[int]:
    return span.tolist() if hasattr(span, "tolist") else [int(t) for t in span]


def frozen_start(req: Request) -> int:
    """First canvas position a refresh must recompute: past the frozen / prefix-cached pages."""
    return req.num_frozen_tokens if req.prefix_published else req.num_cached_tokens


def refresh_start(req: Request, refresh: str) -> int:
    """Where the active block's refresh window starts: the frozen prefix's end (full), or the
    start of the block that just finished (incremental), or where its chunks stopped."""
    start = frozen_start(req)
    if refresh == "incremental" and req.block_idx > 0:
        start = max(start, req.block_start - req.params.block_length)
    return max(start, req.refresh_from)


def refresh_chunk(req: Request, item: ScheduledRequest, budget: int, min_chunk: int
                  ) -> ScheduledRequest | None:
    """A PREFILL piece of `item` (a refresh too big for `budget`): K/V of [q_start, q_start + c)
    with c <= budget, never reaching the active block (the refresh's last step decodes it).
    Its queries see the keys written so far: [0, max(chunk end, kv_written))."""
    c = min(budget, req.block_start - item.q_start)
    if c < min_chunk:
        return None
    end = item.q_start + c
    return replace(item, kind=PREFILL, q_len=c, kv_len=max(end, req.kv_written), cand_start=end,
                   cand_end=end, num_candidates=0, quota=0, k=0, policy="fixed",
                   force_position=None)


def step_policy(req: Request, kind: str) -> tuple[str, str | None]:
    """(policy, Dream confidence) of this step. Fast-dLLM's cached Dream steps score by negative
    entropy whatever `alg` says (unless the threshold rule is on): `generation_utils_block`."""
    p = req.params
    if kind == CACHED and p.alg is not None and p.threshold is None:
        p = replace(p, alg="entropy")
    alg = "maskgit_plus" if p.threshold is not None and p.alg is not None else p.alg
    return p.policy, alg


def commit_count(policy: str, quota: float, n: int) -> int:
    """k of the top-k style policies: the quota, at least one (the contract), at most n; a zero
    quota commits nothing (ML-GSAI's empty steps, the hub's `if k > 0`, Dream's cached forward
    past its schedule)."""
    if policy == "klass" and n:          # KLASS's fallback: the schedule's top-k, >= 1 past it
        return min(max(int(quota), 1), n)
    if policy not in QUOTA_POLICIES or n == 0:
        return 0
    q = int(quota)
    return 0 if q == 0 else min(max(q, 1), n)


def quota(req: Request, mode: str, masked: int) -> float:
    """The schedule's offer for this step: a count, or for Dream `origin` a probability."""
    p, i, spb = req.params, req.block_step, req.steps_per_block
    if not is_dream(req):
        return req.block_quota[i] if i < len(req.block_quota) else 0
    if mode == "none":
        if p.threshold is not None:
            return req.carry.quota()
        if p.alg == "origin":
            return float(transfer_probs(spb, p.eps)[min(i, spb - 1)])
        return dream_quota(masked, i, spb, p.eps)
    if p.threshold is not None:          # cached confidence_threshold: offer every block mask
        return masked
    return dream_quota(masked, i, spb, p.eps) if i < spb else 0


def after_step(req: Request, item: ScheduledRequest, num_committed: int, mode: str) -> bool:
    """Advance the block counters after a step's commits; True when the block is done."""
    req.block_step += 1
    req.refresh_from = 0                 # the next (mid-block) refresh recomputes its window whole
    if req.carry is not None and mode == "none":
        req.carry.update(item.schedule_step, int(item.quota), num_committed)
    left = req.masked_block
    spb, p = req.steps_per_block, req.params
    if is_dream(req) and mode != "none":
        if req.block_step < 2:           # the refresh is always followed by a cached forward
            return False
        return left == 0 or (p.threshold is None and req.block_step > spb)
    if left == 0:
        return True
    if p.policy in UNBOUNDED:            # revocable / stateful blocks end only with no mask left
        return False
    if is_dream(req):
        return req.block_step >= (req.carry.steps if req.carry is not None else spb)
    return (p.policy in SCHEDULED_POLICIES or mode == "dual") and req.block_step >= spb
