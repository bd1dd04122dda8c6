"""The Dream reference loop: hub `diffusion_generate` and Fast-dLLM v1's Dream variants, one loop.

    x, nfe = dream_generate(model, prompt, params, spec=spec, attention_mask=am, cache=None)

- `cache=None`: hub `DreamGenerationMixin._sample` (alg origin | maskgit_plus | topk_margin |
  entropy, alg_temp, temperature, top_p, top_k, left padding), or with `params.threshold` set
  Fast-dLLM's `alg='confidence_threshold'` (`v1/dream/model/generation_utils.py`).
- `cache="prefix" | "dual"`: Fast-dLLM `generation_utils_block.py` (`block_length`, `dual_cache`).

Each mode is a *window* of canvas rows every forward computes, a *region* of it that may be
committed, and a *schedule* saying how many positions each step offers and when to stop
(REFERENCE_ALGORITHMS.md sections 5-6). Every step is the same: shift the window's logits, score
the masked positions (`propose_dream`, one batched draw in row-major order, as the official
`logits[mask_index]`), then one policy call per row (dream.py) over the whole window, with
confidence -inf where a position may not be committed: exactly the official `full_confidence`,
so `torch.topk` and `torch.multinomial` see the same rows and consume the RNG the same way.
Random draws use the global RNG (seed with `torch.manual_seed` first, as the fixtures do).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.kv_hooks import Capture, DualKV, PrefixKV
from ..models.layers import pair_mask_bias
from .candidates import Candidates
from .dream import (DREAM_POLICIES, ThresholdCarry, dream_policy, dream_quota, dream_transfer_prob,
                    propose_dream, sample_tokens, shift_logits)
from .params import SamplingParams

CACHE_MODES = (None, "prefix", "dual")


@dataclass
class Canvas:
    x: Tensor                  # (B, L) int64: prompt then max_tokens mask tokens
    positions: Tensor          # (B, L) int64 RoPE positions (tok_idx = cumsum(mask) - 1 if padded)
    bias: Optional[Tensor]     # (B, 1, L, L) float pair mask: pads neither attend nor are attended
    prompt_len: int


def make_canvas(prompt: Tensor, gen_length: int, mask_id: int,
                attention_mask: Optional[Tensor] = None) -> Canvas:
    """hub `_sample` set-up: right-pad with masks; an attention mask with a 0 gives tok_idx
    positions (pads get position 1) and the pair mask; an all-ones mask is the same as none."""
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    b, length = x.shape
    if attention_mask is None or not bool((attention_mask == 0).any()):
        pos = torch.arange(length, device=x.device).expand(b, length)
        return Canvas(x, pos, None, prompt.shape[1])
    am = F.pad(attention_mask.long(), (0, gen_length), value=1)
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    return Canvas(x, pos, pair_mask_bias(am), prompt.shape[1])


def forward_window(model, spec, c: Canvas, start: int, stop: int, kv=None) -> Tensor:
    """Canvas rows [start, stop) -> (B, stop - start, V) logits, shifted WITHIN the window
    (Fast-dLLM shifts each cached window on its own, so its first row keeps its own output)."""
    bias = None if c.bias is None else c.bias[:, :, start:stop, :]
    logits = model(c.x[:, start:stop], c.positions[:, start:stop], bias, kv)
    return shift_logits(logits) if spec.logits_shift else logits


# ---- schedules: how many positions a step offers each row, and when a window is done ----------
# more(region_masked) is asked before each forward; quotas(region_masked) after it, one per row
# (None: stop without committing); update(offered, committed) after the commit.

class TimeSchedule:
    """hub: steps i = first .. steps-1, each offering dream_quota(batch-mean masks) (or origin's
    transfer probability). `until_done` (Fast-dLLM blocks): stop once the region has no mask, and
    after the forward at i == steps stop without committing (`if i == steps_per_block: break`)."""

    def __init__(self, steps: int, eps: float, origin: bool, first: int = 0, until_done=False):
        self.steps, self.eps, self.origin, self.i = steps, eps, origin, first
        self.until_done, self.started = until_done, False

    def more(self, region_masked: Tensor) -> bool:
        if self.until_done:
            return not self.started or bool(region_masked.any())
        return self.i < self.steps

    def quotas(self, region_masked: Tensor) -> Optional[list]:
        self.started = True
        if self.i >= self.steps:
            return None
        if self.origin:
            return [dream_transfer_prob(self.i, self.steps, self.eps)] * region_masked.shape[0]
        mean = region_masked.sum() / region_masked.shape[0]      # float32 batch mean, as the hub
        return [dream_quota(mean, self.i, self.steps, self.eps)] * region_masked.shape[0]

    def update(self, offered: list, committed: list) -> None:
        self.i += 1


class CarrySchedule:
    """Fast-dLLM no-cache `confidence_threshold`: per-row ThresholdCarry (the official code is
    batch 1; rows here run as they would alone, a finished row offers 0)."""

    def __init__(self, masked: Tensor, steps: int):
        counts = masked.sum(1).tolist()
        bad = [n for n in counts if n % steps]
        if bad:
            raise ValueError(f"steps={steps} is invalid for the Dream threshold schedule: it must "
                             f"divide the number of masked positions ({bad[0]})")
        self.rows = [ThresholdCarry(n // steps, steps) for n in counts]
        self.i = 0

    def more(self, region_masked: Tensor) -> bool:
        return any(self.i < r.steps for r in self.rows)

    def quotas(self, region_masked: Tensor) -> list:
        return [r.quota() if self.i < r.steps else 0 for r in self.rows]

    def update(self, offered: list, committed: list) -> None:
        for r, o, n in zip(self.rows, offered, committed):
            if self.i < r.steps:
                r.update(self.i, o, n)
        self.i += 1


class BlockThresholdSchedule:
    """Fast-dLLM cached `confidence_threshold`: offer every mask of the block until none is left."""

    def __init__(self):
        self.started = False

    def more(self, region_masked: Tensor) -> bool:
        return not self.started or bool(region_masked.any())

    def quotas(self, region_masked: Tensor) -> list:
        self.started = True
        return region_masked.sum(1).tolist()

    def update(self, offered: list, committed: list) -> None:
        pass


# ---- one step ---------------------------------------------------------------------------------

def commit_step(xw: Tensor, logits: Tensor, scored: Tensor, eligible: Tensor,
                params: SamplingParams, quotas: list, mask_id: int) -> list[int]:
    """xw (B, W) canvas window (written in place); logits (B, W, V) shifted; scored (B, W) the
    positions whose tokens are drawn; eligible (B, W) those that may be committed.
    -> committed count per row."""
    name = dream_policy(params)
    if name == "dream_origin":
        return _origin_step(xw, logits, scored, params, quotas[0])
    policy = DREAM_POLICIES[name]
    cand = propose_dream(logits[scored], params)         # (N,) over the batch, row-major
    tokens = torch.full_like(xw, mask_id)
    tokens[scored] = cand.tokens
    conf = torch.full(xw.shape, float("-inf"), dtype=torch.float64, device=xw.device)
    conf[eligible] = cand.conf[eligible[scored]]
    entropy = torch.full(xw.shape, float("inf"), dtype=torch.float64, device=xw.device)
    entropy[eligible] = cand.entropy[eligible[scored]]
    counts = []
    for b, quota in enumerate(quotas):
        commit = torch.zeros_like(eligible[b])
        if quota > 0:                                    # the hub skips the step when k == 0
            commit = policy(Candidates(tokens[b], conf[b], entropy[b]), quota, params, None)
        xw[b, commit] = tokens[b, commit]                # mask_id where not scored (hub quirk)
        counts.append(int(commit.sum()))
    return counts


def _origin_step(xw: Tensor, logits: Tensor, masked: Tensor, params: SamplingParams,
                 p: Tensor) -> list[int]:
    """hub alg='origin': coin flips over every masked position of the batch first (`rand(n) < p`),
    then tokens drawn for the flipped positions only (the official draw order)."""
    n = int(masked.sum())
    zeros = torch.zeros(n, dtype=torch.float64, device=xw.device)   # the coins need only the count
    blank = Candidates(zeros.long(), zeros, zeros)
    flips = DREAM_POLICIES["dream_origin"](blank, p, params, None)    # (N,) bool
    picked = torch.zeros_like(masked)
    picked[masked] = flips
    xw[picked] = propose_dream(logits[picked], params).tokens
    return picked.sum(1).tolist()


def run_window(model, spec, c: Canvas, params: SamplingParams, sched, window: tuple[int, int],
               region_len: int, score_all: bool, kv=None, history: Optional[list] = None) -> int:
    """Steps over canvas rows window = [start, stop) until `sched` stops. Positions
    [start, start + region_len) may be committed; `score_all` draws tokens for every masked window
    row (Fast-dLLM's threshold alg) instead of the region only. -> forwards run."""
    start, stop = window
    xw = c.x[:, start:stop]                                        # a view: commits land in c.x
    in_region = torch.arange(stop - start, device=c.x.device) < region_len
    nfe = 0
    while sched.more((xw == spec.mask_token_id) & in_region):
        masked = xw == spec.mask_token_id
        logits = forward_window(model, spec, c, start, stop, kv)
        nfe += 1
        quotas = sched.quotas(masked & in_region)
        if quotas is None:
            break
        eligible = masked & in_region
        committed = commit_step(xw, logits, masked if score_all else eligible, eligible, params,
                                quotas, spec.mask_token_id)
        sched.update(quotas, committed)
        if history is not None:
            history.append(c.x.clone())
    return nfe


# ---- the loop ---------------------------------------------------------------------------------

def dream_generate(model, prompt: Tensor, params: SamplingParams, *, spec,
                   attention_mask: Optional[Tensor] = None, cache: Optional[str] = None,
                   history: Optional[list] = None) -> tuple[Tensor, int]:
    """prompt (B, Lp) int64 -> (x (B, Lp + max_tokens) int64, nfe = model forwards).

    attention_mask (B, Lp) 1 = token, 0 = left padding (hub semantics: tok_idx positions and the
    pair mask, so a padded row equals its prompt run alone), in every mode. Fast-dLLM's modeling
    ignores tok_idx and its cached loop cannot take a padding mask (shape error), so padded
    threshold / cached runs have no official counterpart. cache None | "prefix" | "dual".
    history: when a list, x after every committing step is appended (hub `output_history`).
    `params.alg` None means the hub default, "origin".
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r} is invalid: use one of {CACHE_MODES}")
    params = params.resolve()
    if params.alg is None:
        params = replace(params, alg="origin")
    c = make_canvas(prompt, params.max_tokens, spec.mask_token_id, attention_mask)
    with torch.inference_mode():
        if cache is None:
            nfe = _run_uncached(model, spec, c, params, history)
        else:
            nfe = _run_blocks(model, spec, c, params, cache == "dual", history)
    return c.x, nfe


def _run_uncached(model, spec, c: Canvas, params: SamplingParams, history) -> int:
    """hub `_sample` / Fast-dLLM `confidence_threshold`: every step a full-canvas forward; every
    masked position of the canvas (masks inside the prompt too) competes."""
    length = c.x.shape[1]
    if params.threshold is not None:
        sched = CarrySchedule(c.x == spec.mask_token_id, params.steps)
    else:
        sched = TimeSchedule(params.steps, params.eps, origin=params.alg == "origin")
    return run_window(model, spec, c, params, sched, (0, length), length, score_all=True,
                      history=history)


def _run_blocks(model, spec, c: Canvas, params: SamplingParams, dual: bool, history) -> int:
    """Fast-dLLM `generation_utils_block._sample`: per block a full forward (KV captured) that
    commits the block's FIRST token unconditionally, then cached forwards over the window
    ([s, L) prefix cache, [s, e) dual cache) until the block has no mask. Any alg other than
    the threshold scores by negative entropy here, with the time schedule restarted per block
    at step 1 of steps_per_block."""
    gen, block = params.max_tokens, params.block_length
    if gen % block or params.steps % (gen // block):
        raise ValueError(f"block_length={block}, steps={params.steps} are invalid: block_length "
                         f"must divide max_tokens={gen} and steps must be a multiple of the blocks")
    spb = params.steps // (gen // block)
    thr = params.threshold is not None
    block_params = params if thr else replace(params, alg="entropy")
    b, length = c.x.shape
    nfe = 0
    for s in range(c.prompt_len, c.prompt_len + gen, block):
        captured = Capture()
        logits = forward_window(model, spec, c, 0, length, captured)    # (B, L, V)
        nfe += 1
        # drawn over the whole canvas (B*L rows), as the official call on all logits
        _, x0 = sample_tokens(logits.reshape(b * length, -1), params.temperature, params.top_p,
                              params.top_k)
        c.x[:, s] = x0.view(b, length)[:, s]
        kv = DualKV(captured, s, s + block) if dual else PrefixKV(captured, s)
        window = (s, s + block) if dual else (s, length)
        sched = (BlockThresholdSchedule() if thr else
                 TimeSchedule(spb, params.eps, origin=False, first=1, until_done=True))
        nfe += run_window(model, spec, c, block_params, sched, window, block, score_all=thr,
                          kv=kv, history=history)
    return nfe
