"""APD's step functions (Israel et al., "Accelerating Diffusion LLMs via Adaptive Parallel
Decoding"): the window, the draft, and the mixture acceptance, as pure functions over tensors.

Follows danielmisrael/apd @ a555561 `dream/generation_utils.py` (`apd_sample`,
`sample_with_gumbel`, `apd_accept_criterion`); REFERENCE_ALGORITHMS.md section 8. One step:

    left, right = apd_window(curr, length, params, prev_accept, cached)
    x0 = apd_draft(mask_logits, temperature, top_p, top_k)          # (n,) the window's masks
    n_acc = apd_accept_length(x0[None], d_logits[None], v_logits[None], weight)   # (B,) batched

`apd_accept_length` takes a batch with ragged drafts (`lengths`) so the engine can decide every
APD request of a step in one call; the reference loop calls it with B = 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .dream import top_k_logits, top_p_logits
from .noise import add_gumbel_noise

Weights = Union[float, Sequence[float], Tensor]


@dataclass(frozen=True)
class APDParams:
    """One APD (or `leftright`) call: the official `diffusion_generate` knobs, paper names."""
    max_new_tokens: int                        # generation positions after the prompt
    apd_mixture_weight: Optional[float] = None  # R: target = R * dLLM + (1 - R) * verifier logits;
    #                                            None = `leftright` (no verifier, k per step)
    kv_window: Optional[int] = None            # W: recompute only the last W committed positions
    #                                            (needs diffusion_cache; else ignored, as official)
    max_lookahead: Optional[int] = None        # M: draft at most M positions per step (None: all)
    temperature: float = 0.0                   # draft temperature (the target is always argmax)
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    tokens_per_step: Optional[int] = None      # k of `leftright`
    diffusion_cache: bool = False              # the Dream config's `use_cache` (default False)

    def __post_init__(self):
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an int >= 1")
        r = self.apd_mixture_weight
        _check(r is None or 0.0 <= r <= 1.0, "apd_mixture_weight", r, "a float in [0, 1] or None")
        for name in ("kv_window", "max_lookahead", "top_k"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, v, "an int >= 1 or None")
        _check(self.temperature >= 0, "temperature", self.temperature, "a float >= 0")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1] or None")
        k = self.tokens_per_step
        if r is None:
            _check(k is not None and k >= 1, "tokens_per_step", k,
                   "an int >= 1 when apd_mixture_weight is None (leftright decoding)")
            _check(self.max_lookahead is None or k <= self.max_lookahead, "tokens_per_step", k,
                   f"at most max_lookahead={self.max_lookahead} (the official loop fails there)")


def _check(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: it must be {rule}")


def apd_window(curr: int, length: int, p: APDParams, prev_accept: int,
               cached: bool) -> tuple[int, int]:
    """-> [left, right): the canvas rows the dLLM computes this step.

    right = curr + M (canvas end when M is None). left = 0 until a diffusion cache exists, then
    curr - W - prev_accept + 1: the last W positions before this step's first accepted token are
    recomputed, everything left of them comes from the cache (official `apd_sample`)."""
    right = length if p.max_lookahead is None else min(curr + p.max_lookahead, length)
    if not cached or p.kv_window is None:
        return 0, right
    return max(curr - p.kv_window - prev_accept + 1, 0), right


def apd_draft(mask_logits: Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
              top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """(n, V) shifted dLLM logits of the masked window rows -> draft tokens (n,) int64.

    `sample_with_gumbel`: argmax at temperature 0; else logits / T, top-p then top-k in float32,
    then argmax(exp(l) / (-log u)^T) with u float64 (one draw of (n, V) per step). The
    temperature enters twice (l / T, then the exponent), exactly as the official code does."""
    if temperature > 0:
        mask_logits = mask_logits / temperature
    if top_p is not None and top_p < 1:
        mask_logits = top_p_logits(mask_logits, top_p)
    if top_k is not None:
        mask_logits = top_k_logits(mask_logits, top_k)
    return add_gumbel_noise(mask_logits, temperature, generator).argmax(-1)


def apd_accept_length(draft: Tensor, diffusion_logits: Tensor, verifier_logits: Tensor,
                      weight: Weights, lengths: Optional[Tensor] = None) -> Tensor:
    """How many draft tokens each row commits.

    draft (B, n) int64; diffusion_logits (B, n, Vd) and verifier_logits (B, n, Vv) raw logits for
    the same positions (verifier already shifted: row j predicts draft position j); weight R per
    row (float or (B,)); lengths (B,) valid draft tokens per row (ragged drafts, default n).
    -> (B,) int64 in [1, lengths]: the leading run where draft == argmax(R*d + (1-R)*v), the
    first token always kept (`apd_accept_criterion`: accept[:, 0] = 1, cumprod). The dLLM logits
    are cut to the verifier's vocabulary (the official code cuts to 151936 = Qwen2.5's).
    R and 1 - R are formed in float64 and cast, as the official Python floats are."""
    b, n = draft.shape
    vv = verifier_logits.shape[-1]
    if diffusion_logits.shape[-1] < vv:
        raise ValueError(f"diffusion_logits vocabulary {diffusion_logits.shape[-1]} < the "
                         f"verifier's {vv}: APD needs a verifier over the drafter's tokenizer")
    r = torch.as_tensor(weight, dtype=torch.float64, device=draft.device).expand(b)
    wd = r.to(diffusion_logits.dtype)[:, None, None]
    wv = (1 - r).to(verifier_logits.dtype)[:, None, None]
    target = wd * diffusion_logits[..., :vv] + wv * verifier_logits
    accept = draft == target.argmax(-1)
    accept[:, 0] = True
    if lengths is not None:
        accept &= torch.arange(n, device=draft.device)[None] < lengths[:, None]
    return accept.long().cumprod(-1).sum(-1)
