"""A forward group's inputs: packed on the host in one tensor, expanded on the device by index ops.

The host knows, per scheduled request, a handful of integers (slot, window, candidate range,
quota, step): `pack_group` puts them in one (B, META) float64 tensor, which goes to the device in
one copy. `expand_group` derives everything else there from the `InputBatch`: the window's token
ids (a gather from the resident canvas), RoPE positions, the key mask (only when some row is
shorter than the padded width), the paged KV slots, the candidates (the masked positions of each
row's range, compacted left by a cumsum/scatter: no `nonzero`) and the LM-head rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.spec import ModelSpec
from ..sampling.batch import GroupFacts, RowKnobs
from .input_batch import COL, CONF_ALGS, InputBatch
from .kv_pool import KVPool, to_device
from .outputs import FULL, HYBRID, REFRESH, ScheduledRequest
from .paged_attention import build_paged_attention
from .paged_kv import build_paged_kv
from .request import Request

# Columns of the packed per-row metadata
META = ("slot", "q_start", "q_len", "kv_len", "cand_start", "cand_end", "k", "quota", "step",
        "block_start", "prompt_len", "policy", "conf_alg", "block_step")
M = {name: i for i, name in enumerate(META)}


@dataclass
class GroupPlan:
    """Host side of one forward group (no device data but the packed meta)."""
    items: list[ScheduledRequest]
    kind: str
    lq: int                   # padded query width
    lk: int                   # padded key width
    lc: int                   # widest candidate range
    n_max: int                # most candidates of a row (LM-head rows per row)
    gen_width: int            # generation positions copied back per row
    needs_mask: bool          # some row's keys are shorter than lk
    revocable: bool           # WINO: candidates are every block position, a shadow follows
    stateful: bool            # KLASS: per-position state across steps (engine/stateful.py)
    passthrough: bool         # every row's window is its whole canvas (refresh from 0)
    facts: GroupFacts
    meta: Tensor              # (B, len(META)) float64 on the host


def pack_group(items: list[ScheduledRequest], requests: dict[str, Request], family: str,
               conf_dtype: torch.dtype, gen_width: int) -> GroupPlan:
    kind = items[0].kind
    lq = max(i.q_len for i in items)
    lk = lq if kind == FULL else max(i.kv_len for i in items)
    if kind == HYBRID and items[0].policy != "apd_cached":
        lk = lq                                   # no drafter cache: keys = the window [0, right)
    policies = tuple(dict.fromkeys(i.policy for i in items))
    rows, params = [], []
    for it in items:
        req = requests[it.request_id]
        end = it.cand_start + 1 if it.force_position is not None else it.cand_end
        conf_alg = CONF_ALGS[it.conf_alg] if family == "dream" else -1
        rows.append((it.slot, it.q_start, it.q_len, it.kv_len, it.cand_start, end, it.k,
                     it.quota, req.nfe, req.block_start, req.prompt_len,
                     policies.index(it.policy), conf_alg, it.schedule_step))
        params.append(req.params)
    facts = GroupFacts(
        family=family, policies=policies, sampled=any(p.temperature > 0 for p in params),
        random_remask=any(p.remasking == "random" for p in params),
        logits_eos_inf=any(p.logits_eos_inf for p in params),
        conf_eos_eot_inf=any(p.confidence_eos_eot_inf for p in params),
        top_p=any(p.top_p is not None and p.top_p < 1 for p in params),
        top_k=any(p.top_k for p in params),
        conf_algs=frozenset(r[M["conf_alg"]] for r in rows), conf_dtype=conf_dtype)
    return GroupPlan(
        items=items, kind=kind, lq=lq, lk=lk,
        lc=max(r[M["cand_end"]] - r[M["cand_start"]] for r in rows),
        n_max=max(1, max(i.num_candidates for i in items)), gen_width=gen_width,
        needs_mask=any(i.kv_len != lk for i in items), revocable=policies == ("wino",),
        stateful=policies == ("klass",),
        passthrough=kind == REFRESH and all(i.q_start == 0 and i.q_len == i.kv_len == lk
                                            for i in items),
        facts=facts, meta=torch.tensor(rows, dtype=torch.float64))


@dataclass
class GroupInputs:
    """Device side of one forward group."""
    input_ids: Tensor         # (B, Lq) int64
    positions: Tensor         # (B, Lq) int64 absolute RoPE positions
    attn_mask: Tensor | None  # (B, 1, 1, Lk) bool, True = attend; None when every row is full
    kv: object                # PagedKV | PagedAttention | None
    logits_index: Tensor      # (B, n) int64 query rows whose output is decoded
    cand_offset: Tensor       # (B, n) int64 candidate position - q_start (its window column)
    cand_flat: Tensor         # (B, n) int64 flat canvas index of each candidate (padding: dump)
    in_block: Tensor          # (B, n) bool candidate lies in the active block
    gen_flat: Tensor          # (B, W) int64 flat canvas index of the generation positions
    slot: Tensor              # (B,) int64 the rows' InputBatch slots
    knobs: RowKnobs


def expand_group(g: GroupPlan, batch: InputBatch, pool: KVPool | None, spec: ModelSpec
                 ) -> GroupInputs:
    dev = batch.device
    m = to_device(g.meta, dev)                                       # the group's one H2D copy
    im = m.long()
    col = lambda name: im[:, M[name]]                                # noqa: E731
    slot, q_start = col("slot"), col("q_start")
    base = (slot * batch.row_len)[:, None]                           # (B, 1) flat row offset
    ar = torch.arange(max(g.lq, g.lk, g.lc, g.gen_width, g.n_max + 1), device=dev)
    positions = q_start[:, None] + ar[:g.lq]                         # (B, Lq)
    flat = batch.flat_canvas
    input_ids = flat[base + positions.clamp(max=batch.max_len)]
    attn_mask = None
    if g.needs_mask:
        attn_mask = (ar[:g.lk] < col("kv_len")[:, None])[:, None, None, :]
    kv = None
    uses_pool = g.kind not in (FULL, HYBRID) or g.items[0].policy == "apd_cached"
    if uses_pool and batch.page_map is None:
        kv = build_paged_kv(pool, batch.page_table[slot], q_start, col("q_len"), g.lq, g.lk,
                            g.passthrough)
    elif uses_pool:                          # attention_backend="flex": pages read in place
        kv = build_paged_attention(pool, batch.page_map, batch.page_table[slot], q_start,
                                   col("q_len"), col("kv_len"), g.lq, g.lk, g.passthrough)
    cand_pos, valid = _candidates(g, batch, base, col("cand_start"), col("cand_end"), ar)
    rows = offset = cand_pos - q_start[:, None]
    if spec.logits_shift:                    # Dream: row r - 1 predicts position r (r > 0)
        rows = rows - (rows > 0).to(rows.dtype)
    gen_pos = (col("prompt_len")[:, None] + ar[:g.gen_width]).clamp(max=batch.max_len)
    return GroupInputs(
        input_ids=input_ids, positions=positions, attn_mask=attn_mask, kv=kv,
        logits_index=rows.clamp(min=0, max=g.lq - 1), cand_offset=offset.clamp(min=0, max=g.lq),
        cand_flat=base + cand_pos,
        in_block=cand_pos >= col("block_start")[:, None], gen_flat=base + gen_pos, slot=slot,
        knobs=_knobs(batch, slot, m, im, cand_pos, valid))


def _candidates(g: GroupPlan, batch: InputBatch, base: Tensor, start: Tensor, end: Tensor,
                ar: Tensor) -> tuple[Tensor, Tensor]:
    """The masked positions of each row's range [start, end), in order, left-compacted into
    (B, n_max) (padding = the dump column), and their validity."""
    dump = batch.max_len
    pos = start[:, None] + ar[:g.lc]                                  # (B, Lc)
    tok = batch.flat_canvas[base + pos.clamp(max=dump)]
    is_cand = ar[:g.lc] < (end - start)[:, None]
    if not g.revocable:                   # WINO: committed block positions stay candidates
        is_cand = is_cand & (tok == batch.mask_id)
    target = torch.where(is_cand, (is_cand.cumsum(1) - 1).clamp_(max=g.n_max), g.n_max)
    out = torch.full((len(g.items), g.n_max + 1), dump, dtype=torch.long, device=base.device)
    out.scatter_(1, target, torch.where(is_cand, pos, dump))
    cand_pos = out[:, :g.n_max]
    return cand_pos, cand_pos != dump


def _knobs(batch: InputBatch, slot: Tensor, m: Tensor, im: Tensor, cand_pos: Tensor,
           valid: Tensor) -> RowKnobs:
    """The rows' knobs: the slot table's rows, columns sliced lazily (a greedy threshold step
    reads one column; every other slice would be an op for nothing)."""
    return RowKnobs(table=batch.knobs[slot], col=COL, meta=m, imeta=im, meta_col=M,
                    seeds=batch.seeds[slot], positions=cand_pos, valid=valid)
