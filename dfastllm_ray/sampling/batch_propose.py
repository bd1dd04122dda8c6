"""Batched `propose`: tokens, confidences and entropies for every candidate of a group at once.

The batched twin of `propose.py` / `dream.propose_dream`, with no host sync and no per-request
loop. Two changes of method, same semantics:
- A sampled token (temperature T > 0) is drawn by inverse CDF from softmax(logits / T) with one
  counter-based uniform per position (rng.py). LLaDA's Gumbel-max `argmax(exp(l) / (-log u)^T)`
  and Dream's `Categorical(probs)` are draws from the same distribution; the inverse CDF needs
  one uniform per position instead of one per vocabulary entry. Greedy rows take the argmax, as
  both official codes do at T = 0, so deterministic requests are token-identical to them.
- Confidences are computed in `GroupFacts.conf_dtype`: float32 on the fast path; float64 where
  bit-exact ties with Fast-dLLM's float64 softmax matter (the engine's `sampler_dtype`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import rng
from .batch import CONF_MARGIN, CONF_NEG_ENTROPY, CONF_PROB, GroupFacts, RowKnobs
from .dream import NEG_ENTROPY_EPS

NEG_INF = float("-inf")
# Vocabulary tile of the CPU argmax (argmax_last): torch's CPU argmax is a scalar loop, its amax
# a vectorised one; 32-64 wide tiles measured 2-3x faster than one argmax over 512 and 126,464
ARGMAX_TILE = 64
# ... but the tiles cost five ops where argmax is one: below this many elements (12 x 512 took
# 22 us by argmax, 97 us by tiles; 12 x 4096 and 192 x 512 were faster by tiles) one argmax wins
ARGMAX_TILED_MIN = 1 << 15


def propose_batch(logits: Tensor, knobs: RowKnobs, facts: GroupFacts, eos_id: int | None,
                  eot_id: int | None, dense: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Callable[[], Tensor]]:
    """logits (B, n, V) at the candidates -> tokens (B, n) int64, conf (B, n), entropy thunk.

    Invalid (padding) slots get conf -inf, so every policy ranks them last. `dense` (N,): the
    flat (B * n) index of the real candidates; the greedy rules then run over those N rows only
    (the same values: each row's softmax and argmax depend on that row alone)."""
    if dense is not None and greedy_only(facts):
        tokens, conf = _propose_dense(logits, dense, facts)       # conf -inf at padding
        if facts.family != "dream" and facts.random_remask:
            conf = torch.where(knobs.valid, _random_remask(conf, knobs, facts), NEG_INF)
        return tokens, conf, lambda: _entropy(logits.to(facts.conf_dtype))
    if facts.family == "dream":
        tokens, conf, entropy = _propose_dream(logits, knobs, facts)
    elif facts.family == "sdar":
        tokens, conf, entropy = _propose_sdar(logits, knobs, facts)
    else:
        tokens, conf, entropy = _propose_llada(logits, knobs, facts, eos_id, eot_id)
    if facts.padded:                  # no padding slot (every row has n candidates): no mask
        conf = torch.where(knobs.valid, conf, NEG_INF)
    return tokens, conf, entropy


def _propose_llada(logits: Tensor, knobs: RowKnobs, facts: GroupFacts, eos_id, eot_id):
    """ML-GSAI `generate` / Fast-dLLM `get_transfer_index`, every row at once."""
    lg = logits if logits.dtype == facts.conf_dtype else logits.to(facts.conf_dtype)
    if facts.logits_eos_inf:                                   # never predict EOS
        lg = _mask_vocab(lg, knobs.logits_eos_inf, [eos_id])
    tokens = argmax_last(lg)
    if facts.sampled:
        tokens = torch.where(knobs.hot, _draw_probs(F.softmax(lg / knobs.temp_div, dim=-1), knobs),
                             tokens)
    conf_logits = lg
    if facts.conf_eos_eot_inf:
        # ML-GSAI's chained `= -inf` hits EOT always, EOS only at T == 0 (propose.py explains)
        conf_logits = _mask_vocab(lg, knobs.conf_eos_eot_inf, [eot_id])
        greedy_flag = knobs.conf_eos_eot_inf & (knobs.temperature == 0)
        conf_logits = _mask_vocab(conf_logits, greedy_flag, [eos_id])
    conf = conf_logits.softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, _random_remask(conf, knobs, facts), lambda: _entropy(lg)


def _random_remask(conf: Tensor, knobs: RowKnobs, facts: GroupFacts) -> Tensor:
    """ML-GSAI `remasking="random"`: the confidence of such rows is a uniform draw."""
    if not facts.random_remask:
        return conf
    u = rng.uniform(knobs.rng_keys, rng.CONFIDENCE, conf.dtype)
    return torch.where(knobs.random_remask[:, None], u, conf)


def greedy_only(facts: GroupFacts) -> bool:
    """No row samples or masks the vocabulary, and the confidence is the token's probability:
    tokens and confidences are per-row argmax and softmax, nothing else."""
    plain = not (facts.sampled or facts.logits_eos_inf or facts.conf_eos_eot_inf)
    if facts.family == "sdar":          # its filters change the confidence (top_k=1: 1.0)
        return plain and not (facts.top_p or facts.top_k)
    if facts.family != "dream":
        return plain
    return plain and not (facts.top_p or facts.top_k or facts.needs_entropy) \
        and facts.conf_algs <= {CONF_PROB, -1}


def _propose_dense(logits: Tensor, dense: Tensor, facts: GroupFacts) -> tuple[Tensor, Tensor]:
    """The greedy proposal over the N real candidates, scattered back to (B, n) (padding: token
    0, conf -inf). LLaDA: argmax of the logits; Dream: argmax of the probabilities (hub
    `sample_tokens`' `probs.max`; equal probabilities can come from unequal logits)."""
    b, n, v = logits.shape
    rows = logits.reshape(b * n, v).index_select(0, dense)                        # (N, V)
    if rows.dtype != facts.conf_dtype:
        rows = rows.to(facts.conf_dtype)
    probs = rows.softmax(-1)
    tok = argmax_last(probs if facts.family == "dream" else rows)                  # (N,)
    conf = probs.gather(-1, tok.unsqueeze(1)).squeeze(1)
    tokens = torch.zeros(b * n, dtype=torch.long, device=logits.device).index_copy_(0, dense, tok)
    full = torch.full((b * n,), NEG_INF, dtype=conf.dtype, device=logits.device)
    return tokens.view(b, n), full.index_copy_(0, dense, conf).view(b, n)


def _propose_dream(logits: Tensor, knobs: RowKnobs, facts: GroupFacts):
    """hub `sample_tokens` (temperature, top_p, top_k, margin, neg-entropy), every row at once."""
    lg, probs, tokens = _filter_and_draw(logits, knobs, facts, top_k_first=False)
    conf = probs.gather(-1, tokens[..., None])[..., 0]          # = probs.max(-1), one read
    neg_ent = None
    if CONF_MARGIN in facts.conf_algs:
        top2 = probs.topk(2, dim=-1).values
        conf = torch.where(knobs.conf_alg[:, None] == CONF_MARGIN, top2[..., 0] - top2[..., 1], conf)
    if CONF_NEG_ENTROPY in facts.conf_algs or facts.needs_entropy:
        neg_ent = (probs * torch.log(probs + NEG_ENTROPY_EPS)).sum(-1)
    if CONF_NEG_ENTROPY in facts.conf_algs:
        conf = torch.where(knobs.conf_alg[:, None] == CONF_NEG_ENTROPY, neg_ent, conf)
    return tokens, conf, lambda: -neg_ent if neg_ent is not None else _entropy(lg)


def _propose_sdar(logits: Tensor, knobs: RowKnobs, facts: GroupFacts):
    """SDAR `sample_with_temperature_topk_topp`, every row at once: temperature, top-k, then
    top-p (the reverse of Dream's order), softmax, a draw; the confidence is the drawn token's
    probability after the filters (top_k=1, the official greedy form: 1.0). A row at T = 0,
    which the official sampler cannot run (it divides by T), takes the argmax."""
    lg, probs, tokens = _filter_and_draw(logits, knobs, facts, top_k_first=True)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0], lambda: _entropy(lg)


def _filter_and_draw(logits: Tensor, knobs: RowKnobs, facts: GroupFacts, top_k_first: bool):
    """Temperature, the top-p / top-k filters in the family's order, softmax, then the argmax or
    (rows at T > 0) a draw -> (filtered logits, probabilities, tokens)."""
    lg = logits.to(facts.conf_dtype)
    if facts.sampled:
        lg = lg / knobs.temp_div
    if facts.top_p and facts.top_k:                 # both: one sort of the vocabulary, not two
        lg = _top_k_and_p(lg, knobs.top_k, knobs.top_p, top_k_first)
    elif facts.top_p:
        lg = _top_p(lg, knobs.top_p)
    elif facts.top_k:
        lg = _top_k(lg, knobs.top_k)
    probs = F.softmax(lg, dim=-1)
    tokens = argmax_last(probs)
    if facts.sampled:
        tokens = torch.where(knobs.hot, _draw_probs(probs, knobs), tokens)
    return lg, probs, tokens


def argmax_last(x: Tensor) -> Tensor:
    """x (..., V) -> (...,) int64, `x.argmax(-1)` exactly (the first of equal maxima; NaN wins,
    as in argmax): by tiles (`argmax_tiled`) on a large CPU input. On a GPU, or a small input,
    one argmax kernel is cheaper than five."""
    if x.device.type != "cpu" or x.numel() < ARGMAX_TILED_MIN:
        return x.argmax(dim=-1)
    return argmax_tiled(x)


def argmax_tiled(x: Tensor) -> Tensor:
    """`x.argmax(-1)` by tiles: the tile maxima (a vectorised amax on CPU), the first tile
    holding the row's maximum, then the first maximum inside it."""
    v = x.shape[-1]
    w = ARGMAX_TILE
    if v % w or v < 2 * w:
        return x.argmax(dim=-1)
    lead, nt = x.shape[:-1], v // w
    tiles = x.reshape(-1, nt, w)                                             # (R, V / w, w)
    best = tiles.amax(dim=-1).argmax(dim=-1, keepdim=True)                   # (R, 1) tile
    inner = tiles.gather(1, best.unsqueeze(2).expand(-1, 1, w)).argmax(dim=-1)   # (R, 1)
    return torch.add(inner, best, alpha=w).view(lead)


def _draw_probs(probs: Tensor, knobs: RowKnobs) -> Tensor:
    """Inverse CDF: (B, n, V) probabilities -> (B, n) int64 tokens, one uniform per position."""
    cdf = probs.cumsum(dim=-1)
    u = rng.uniform(knobs.rng_keys, rng.TOKEN, cdf.dtype)
    target = (u * cdf[..., -1])[..., None]                                # (B, n, 1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _mask_vocab(lg: Tensor, rows: Tensor, ids: list[int]) -> Tensor:
    """-inf at vocabulary `ids` for the rows flagged in `rows` (B,) bool."""
    out = lg.clone()
    out[:, :, ids] = torch.where(rows[:, None, None], NEG_INF, lg[:, :, ids])
    return out


def _top_p(lg: Tensor, top_p: Tensor) -> Tensor:
    """hub `top_p_logits` per row (top_p >= 1 rows unchanged): keep the smallest prefix of the
    sorted distribution whose mass crosses top_p (the crossing token is kept)."""
    sorted_lg, idx = torch.sort(lg, dim=-1, descending=True)
    cum = F.softmax(sorted_lg, dim=-1).cumsum(dim=-1)
    remove = cum > top_p.to(cum.dtype)[:, None, None]       # the official float32 comparison
    remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
    remove &= (top_p < 1)[:, None, None]
    mask = torch.zeros_like(remove).scatter_(-1, idx, remove)
    return lg.masked_fill(mask, torch.finfo(lg.dtype).min)


def _top_k(lg: Tensor, top_k: Tensor) -> Tensor:
    """hub `top_k_logits` per row (top_k 0 rows unchanged): keep logits >= the k-th largest."""
    sorted_lg = torch.sort(lg, dim=-1, descending=True).values
    k = top_k.clamp(min=1, max=lg.shape[-1]) - 1
    kth = sorted_lg.gather(-1, k[:, None, None].expand(-1, lg.shape[1], 1))
    drop = (lg < kth) & (top_k > 0)[:, None, None]
    return lg.masked_fill(drop, torch.finfo(lg.dtype).min)


def _top_k_and_p(lg: Tensor, top_k: Tensor, top_p: Tensor, top_k_first: bool) -> Tensor:
    """`_top_k` and `_top_p` in either order over one descending sort: the first filter sets
    its tail to the dtype's minimum, which leaves the sorted order sorted, so the second reads
    the same sort. Same drops as the two calls (ties at the cut aside, as for any sort)."""
    low = torch.finfo(lg.dtype).min
    sorted_lg, idx = torch.sort(lg, dim=-1, descending=True)
    k = top_k.clamp(min=1, max=lg.shape[-1]) - 1
    on_k, on_p = (top_k > 0)[:, None, None], (top_p < 1)[:, None, None]

    def by_k(x: Tensor) -> Tensor:                  # below the k-th largest (kept: ties)
        kth = x.gather(-1, k[:, None, None].expand(-1, lg.shape[1], 1))
        return (x < kth) & on_k

    def by_p(x: Tensor) -> Tensor:                  # past the prefix whose mass crosses top_p
        over = F.softmax(x, dim=-1).cumsum(dim=-1) > top_p.to(x.dtype)[:, None, None]
        return torch.cat([torch.zeros_like(over[..., :1]), over[..., :-1]], dim=-1) & on_p

    first, second = (by_k, by_p) if top_k_first else (by_p, by_k)
    drop = first(sorted_lg)
    drop = drop | second(sorted_lg.masked_fill(drop, low))
    return lg.masked_fill(torch.zeros_like(drop).scatter_(-1, idx, drop), low)


def _entropy(lg: Tensor) -> Tensor:
    """(B, n, V) logits -> (B, n) predictive entropy in nats."""
    return torch.special.entr(F.softmax(lg, dim=-1)).sum(dim=-1)


__all__ = ["propose_batch", "CONF_PROB"]
