"""Batched remasking policies: which candidates of every row of a group to commit, at once.

The batched twins of `policies.py` and `dream.py`'s selection rules, an explicit registry:

    commit = BATCH_POLICIES[name](conf, knobs, ranked)      # (B, n) bool

`conf` (B, n) is -inf at padding slots; `knobs` the rows' parameters (batch.py); `ranked` lazily
sorts the rows once for every policy that needs an order. No `.item()`, `nonzero`, boolean
indexing or loop over rows: per-row quotas become `rank < k`, per-row thresholds broadcast.

Ties: ranks come from a *stable* descending sort, so equal confidences commit in position order
(the lowest position first), which is what `torch.topk` does over the official codes' rows in
every fixture case.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import rng
from .batch import RowKnobs


class Ranked:
    """Lazily computed orders of one group's confidences (each sort runs once per step)."""

    def __init__(self, conf: Tensor, entropy: Callable[[], Tensor], knobs: RowKnobs):
        self.conf, self._entropy, self.knobs = conf, entropy, knobs
        self._rank = self._sorted = self._ent = self._first = None
        self.top: Tensor | None = None   # (B, n) bool: the official topk(k) per row, if computed

    @property
    def entropy(self) -> Tensor:
        if self._ent is None:
            self._ent = self._entropy().masked_fill(~self.knobs.valid, float("inf"))
        return self._ent

    @property
    def sorted_conf(self) -> Tensor:
        self._sort()
        return self._sorted

    @property
    def first(self) -> Tensor:
        """(B, n) bool: each row's most confident slot, the first of equal maxima (rank 0 of
        the stable sort; an argmax when no policy of the group sorts: no sort for it)."""
        if self._first is None:
            if self._rank is not None:
                self._first = self._rank == 0
            else:
                at = self.conf.argmax(dim=-1, keepdim=True)                  # (B, 1)
                self._first = self.columns() == at
        return self._first

    def columns(self) -> Tensor:
        """(n,) int64 0..n-1: the knobs' (an arange the engine keeps per window) or a new one."""
        n = self.conf.shape[-1]
        cols = getattr(self.knobs, "columns", None)
        if cols is None or cols.shape[0] < n:
            return torch.arange(n, device=self.conf.device)
        return cols[:n]

    @property
    def rank(self) -> Tensor:
        """(B, n) int64: 0 for the most confident slot of each row."""
        self._sort()
        return self._rank

    def _sort(self) -> None:
        if self._rank is None:
            self._sorted, order = torch.sort(self.conf, dim=-1, descending=True, stable=True)
            self._rank = ranks_of(order)


def ranks_of(order: Tensor) -> Tensor:
    """order (B, n) from a sort -> rank (B, n): rank[b, order[b, j]] = j (the inverse
    permutation, itself a sort of the permutation: one op)."""
    return order.argsort(dim=-1)


def top_k(ranked: Ranked, k: Tensor) -> Tensor:
    """(B, n) bool: the k[b] most confident of each row (ties: position order, or the official
    torch.topk layout when the engine computed `ranked.top`)."""
    if ranked.top is not None:
        return ranked.top
    return (ranked.rank < k[:, None]) & ranked.knobs.valid


def fixed(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """ML-GSAI `generate` / Dream's top-k rules: the k most confident (k = 0: none)."""
    return top_k(ranked, knobs.k)


def threshold(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """Fast-dLLM `get_transfer_index(threshold)`: conf >= threshold, plus the argmax."""
    hit = (conf >= knobs.column("threshold", conf.dtype)) | ranked.first
    return hit if knobs.all_valid else hit & knobs.valid


def factor(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """Fast-dLLM `get_transfer_index_dynamic(factor)`; quirks as policies.factor: the sorted
    j-th passes while c[j] >= 1 - f / (j + 2) (j = 0 always); k = first failure (n - 1 if none),
    and k in {0, n - 1} becomes k + 1."""
    c = ranked.sorted_conf
    n = knobs.valid.sum(-1, keepdim=True)                                  # (B, 1)
    j = torch.arange(c.shape[-1], device=c.device, dtype=c.dtype)
    thr = 1.0 - knobs.factor[:, None].to(c.dtype) / (j + 2.0)
    fail = (c < thr) & (j > 0) & (j < n)
    first = torch.where(fail.any(-1, keepdim=True), fail.to(torch.int8).argmax(-1, keepdim=True),
                        n - 1)
    k = first + ((first == 0) | (first == n - 1)).to(first.dtype)
    return (ranked.rank < k) & knobs.valid


def entropy_bound(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """EB-sampler: the lowest-entropy slots while their summed entropy <= bound; at least one."""
    ent_sorted, order = torch.sort(ranked.entropy, dim=-1, stable=True)
    within = (ent_sorted.cumsum(-1) <= knobs.entropy_bound[:, None].to(ent_sorted.dtype))
    k = within.sum(-1, keepdim=True).clamp_(min=1)
    return (ranks_of(order) < k) & knobs.valid


def dream_threshold(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """Fast-dLLM Dream `confidence_threshold`: of the k most confident, the first and every one
    not below threshold (float32 comparison, as the official `float32 < python float`)."""
    keep = conf.to(torch.float32) >= knobs.threshold[:, None].to(torch.float32)   # conf is never NaN
    # ranked.first: the argmax, the first of equal maxima, as topk's first value
    return top_k(ranked, knobs.k) & (keep | ranked.first)


def dream_origin(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """Dream `origin`: each candidate unmasks with probability `prob` (float32 coin)."""
    u = rng.uniform(knobs.rng_keys, rng.COIN, torch.float32)
    return (u < knobs.prob[:, None].to(torch.float32)) & knobs.valid


def dream_alg_temp(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """alg_temp > 0: k positions without replacement from softmax(conf / alg_temp), by the
    Gumbel-top-k trick (the same law as sequential `torch.multinomial` without replacement)."""
    t = knobs.alg_temp[:, None].to(torch.float32).clamp(min=1e-12)
    logp = F.log_softmax(conf.to(torch.float32) / t, dim=-1)
    u = rng.uniform(knobs.rng_keys, rng.POSITION, torch.float64)
    g = (logp.to(torch.float64) - torch.log(-torch.log(u))).masked_fill(~knobs.valid, float("-inf"))
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices
    return (ranks_of(order) < knobs.k[:, None]) & knobs.valid


def force(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """Fast-dLLM Dream refresh: the row's single candidate (the block's first position) commits."""
    return knobs.valid


def pc_sampler(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """PC-Sampler (Huang et al. 2025, arXiv 2508.13021), position-aware weighting: the k most
    confident after scaling each confidence by exp(-pc_lambda * i), i = the candidate's offset in
    the active block (the official `pc_sampler_function` over the block slice; lambda 0.25).
    The paper's content calibration (-p log f_bg(token), clipped at alpha) needs a per-model
    corpus frequency table; with a uniform background it is the constant log V, which rescales
    every score alike and leaves the order unchanged (below the alpha clip), so it is left out."""
    rel = (knobs.positions - knobs.block_start[:, None]).clamp(min=0).to(conf.dtype)
    score = conf * torch.exp(-knobs.pc_lambda[:, None].to(conf.dtype) * rel)   # -inf stays -inf
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return (ranks_of(order) < knobs.k[:, None]) & knobs.valid


REV_BITS = 12                           # DUS groups per block up to 4096 (steps per block)
_REV: dict[torch.device, Tensor] = {}


def bit_reversed(r: Tensor, bits: Tensor) -> Tensor:
    """r (B, n) int64 < 2**bits, bits (B, 1) int64 -> r's `bits` low bits reversed: a table of
    the 12-bit reversals (built once per device) and a shift, two ops for any row mix."""
    table = _REV.get(r.device)
    if table is None:
        v = torch.arange(1 << REV_BITS)
        rev = torch.zeros_like(v)
        for b in range(REV_BITS):
            rev |= ((v >> b) & 1) << (REV_BITS - 1 - b)
        table = _REV[r.device] = rev.to(r.device)
    return table[r] >> (REV_BITS - bits)


def dus(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """DUS, dilated unmasking (Luxembourg et al. 2025, "Plan for Speed: Dilated Scheduling for
    Masked Diffusion Language Models"), as a fixed schedule: with s steps per block, the block's
    offsets fall into s dilated groups (offset mod s), and each step commits one group, the groups
    taken in bit-reversed order (s = 4: offsets 0,4,8.. then 2,6,.. then 1,5,.. then 3,7,..). No
    two neighbours commit in the same step while any group is left, so tokens that depend on
    each other (a carry, a sorted run) are decoded apart and each later group sees both of its
    neighbours. The schedule's quota k is the group's size; ranking is group first, confidence
    within (a group with positions already committed, e.g. by a shorter last block, tops up
    from the next)."""
    s = knobs.dus_groups[:, None].to(torch.int64).clamp(min=1)                # (B, 1)
    rel = (knobs.positions - knobs.block_start[:, None]).clamp(min=0)         # (B, n)
    bits = torch.ceil(torch.log2(s.to(torch.float64))).to(torch.int64)        # (B, 1)
    group = bit_reversed(rel % s, bits).to(conf.dtype)                         # (B, n) visit order
    score = conf - 2.0 * group                                                # conf <= 1: group first
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return (ranks_of(order) < knobs.k[:, None]) & knobs.valid


def sched_exit(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """SchED (Mohamed et al. 2025, arXiv 2512.02892): progress-aware early exit. When the block's
    aggregate confidence reaches a threshold that falls smoothly with progress, every remaining
    candidate commits at once; before that the fixed schedule's k most confident do.

    Aggregate: the mean top-1 probability of the block's remaining candidates (the paper averages
    logit margins; the proposal computes no runner-up, so probability stands in). Progress: the
    share of the block already committed, p = 1 - n / block_length. Threshold, linear schedule:
    tau(p) = exit_high - (exit_high - exit_low) * p."""
    valid = knobs.valid
    n = valid.sum(-1)                                                          # (B,)
    mean = torch.where(valid, conf, 0.0).sum(-1) / n.clamp(min=1).to(conf.dtype)
    progress = (1.0 - n.to(conf.dtype) / knobs.block_length.to(conf.dtype)).clamp(0.0, 1.0)
    hi, lo = knobs.exit_high.to(conf.dtype), knobs.exit_low.to(conf.dtype)
    leave = (mean >= hi - (hi - lo) * progress)[:, None]                       # (B, 1)
    return torch.where(leave, valid, top_k(ranked, knobs.k))


def sdar_sequential(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """SDAR `sequential`: the first k masks left to right (the candidates are in position
    order, and a sequential block's masks are one run from its first mask to its end)."""
    return (ranked.columns() < knobs.k[:, None]) & knobs.valid


def sdar_dynamic(conf: Tensor, knobs: RowKnobs, ranked: Ranked) -> Tensor:
    """SDAR `low_confidence_dynamic`: every mask with confidence > threshold (strictly; the
    official float32 comparison) when at least k are, else the k most confident."""
    high = (conf.to(torch.float32) > knobs.column("threshold", torch.float32)) & knobs.valid
    enough = high.sum(-1, keepdim=True) >= knobs.k[:, None]
    return torch.where(enough, high, top_k(ranked, knobs.k))


BatchPolicy = Callable[[Tensor, RowKnobs, Ranked], Tensor]

BATCH_POLICIES: dict[str, BatchPolicy] = {
    "fixed": fixed,
    "threshold": threshold,
    "factor": factor,
    "entropy_bound": entropy_bound,
    "dream_topk": fixed,
    "dream_threshold": dream_threshold,
    "dream_origin": dream_origin,
    "dream_alg_temp": dream_alg_temp,
    "force": force,
    "pc_sampler": pc_sampler,
    "sched_exit": sched_exit,
    "dus": dus,
    "sdar_sequential": sdar_sequential,
    "sdar_static": fixed,                # SDAR low_confidence_static: the top-k rule
    "sdar_dynamic": sdar_dynamic,
}
