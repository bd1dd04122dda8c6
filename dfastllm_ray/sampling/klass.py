"""KLASS (Kim et al., NeurIPS 2025, arXiv 2511.05664): commit what is confident *and* stable.

The official `stable_confident_decode` (shkim0116/KLASS `src/model/llada_klass.py`) commits every
masked position of the active block whose confidence exceeds `conf_threshold` and whose
predictive distribution changed little over the last `history_length` steps:
KL(p_t || p_{t-1}) < `kl_threshold` at each of them. When no position qualifies it falls back to
the fixed schedule's top-k. LLaDA GSM8K defaults (`scripts/llada_gsm8k.sh`): conf_threshold 0.6,
kl_threshold 0.015, history_length 2, unmask_strategy "all".

The official code keeps the previous step's full distribution, positions x vocabulary in
float64 (about 259 MB for a 256-token LLaDA-8B request). Here the state is bounded:

    KlassState.top_ids  (B, n, K) int64    previous step's K most probable tokens per slot
    KlassState.top_p    (B, n, K) float32  their probabilities (all 0: no previous step)
    KlassState.streak   (B, n)    int64    consecutive steps with KL < kl_threshold

and the KL is taken between the two distributions coarsened onto the K + 1 bins {previous
top-K tokens, everything else}. By the data-processing inequality the coarse KL is <= the exact
one (it can only call a position stable a little sooner); with K >= V it is exact (the test
checks both). `streak >= history_length` is the official "all of the last H KLs are small".

Slots are the active block's positions in order (slot j = canvas position block_start + j), so
the engine keeps a (slots, block_length, K) table per request row and resets it when a block
opens: the history starts at the block's first forward (the official history also carries the
previous block's last steps, so there a block can commit by KL one step sooner).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import RowKnobs

KL_EPS = 1e-12          # the official log(p + 1e-12)
TOP_K = 8               # tokens kept per position for the coarse KL
KLASS_CONF = 0.6        # conf_threshold when the request's `threshold` is unset (NaN)
KLASS_KL = 0.015
KLASS_HISTORY = 2


@dataclass
class KlassState:
    top_ids: Tensor     # (B, n, K) int64
    top_p: Tensor       # (B, n, K) float32
    streak: Tensor      # (B, n) int64

    @classmethod
    def empty(cls, b: int, n: int, k: int = TOP_K, device=None) -> "KlassState":
        return cls(torch.zeros(b, n, k, dtype=torch.long, device=device),
                   torch.zeros(b, n, k, dtype=torch.float32, device=device),
                   torch.zeros(b, n, dtype=torch.long, device=device))


def coarse_kl(probs: Tensor, state: KlassState) -> Tensor:
    """probs (B, n, V) of this step -> (B, n) KL(p_t || p_{t-1}) on the bins {previous top-K,
    rest}. Slots with no previous step (top_p all 0) get KL = inf: never stable."""
    p = probs.gather(-1, state.top_ids).to(torch.float64)              # (B, n, K)
    q = state.top_p.to(torch.float64)
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - q.sum(-1)).clamp(min=0.0)
    kl = (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(-1)
    kl = kl + p_rest * (torch.log(p_rest + KL_EPS) - torch.log(q_rest + KL_EPS))
    return torch.where(q.sum(-1) > 0, kl, float("inf"))


def advance(probs: Tensor, state: KlassState, kl_threshold: Tensor) -> KlassState:
    """The state after this step: this step's top-K, streak + 1 where the KL was small."""
    kl = coarse_kl(probs, state)
    top_p, top_ids = probs.topk(state.top_ids.shape[-1], dim=-1)
    small = kl < kl_threshold[:, None].to(kl.dtype)
    return KlassState(top_ids, top_p.to(torch.float32), torch.where(small, state.streak + 1, 0))


def klass(conf: Tensor, knobs: RowKnobs, ranked, probs: Tensor, state: KlassState,
          kl_threshold: Tensor, history: Tensor) -> tuple[Tensor, KlassState]:
    """One step for every row: -> (commit (B, n) bool, the new state).

    conf (B, n): the candidates' confidences (-inf at non-candidates); probs (B, n, V): this
    step's distributions at the same slots; kl_threshold (B,) float, history (B,) int64.
    Commit: valid & conf > conf_threshold & streak >= history (unmask_strategy "all"); a row with
    none commits its fixed-schedule top-k (`knobs.k`), as the official fallback."""
    new = advance(probs, state, kl_threshold)
    thr = knobs.threshold
    thr = torch.where(torch.isnan(thr), KLASS_CONF, thr)[:, None].to(conf.dtype)
    ready = (conf > thr) & (new.streak >= history[:, None]) & knobs.valid
    fallback = (ranked.rank < knobs.k[:, None]) & knobs.valid
    return torch.where(ready.any(-1, keepdim=True), ready, fallback), new


def reference_kl(probs: Tensor, prev: Tensor) -> Tensor:
    """The official full-vocabulary KL(p_t || p_{t-1}): (B, n, V) x2 -> (B, n) (tests only)."""
    p, q = probs.to(torch.float64), prev.to(torch.float64)
    return (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(-1)
