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

import numpy as np
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
    meta: Tensor              # (B, len(META)) float64 on the host: a view of `packed`
    packed: Tensor            # (B * len(META) + N,) float64: meta, then `dense` (one H2D copy)


# Per-request facts of the batched sampler (bits of `row_flags`, OR-ed over a group)
SAMPLED, RANDOM_REMASK, LOGITS_EOS_INF, CONF_EOS_EOT_INF, TOP_P, TOP_K = (1 << i for i in range(6))


def row_flags(req: Request) -> int:
    """The request's sampler facts as bits, computed once (its params never change)."""
    if req.sampler_flags < 0:
        p = req.params
        req.sampler_flags = (
            SAMPLED * (p.temperature > 0) | RANDOM_REMASK * (p.remasking == "random")
            | LOGITS_EOS_INF * bool(p.logits_eos_inf)
            | CONF_EOS_EOT_INF * bool(p.confidence_eos_eot_inf)
            | TOP_P * (p.top_p is not None and p.top_p < 1) | TOP_K * bool(p.top_k))
    return req.sampler_flags


def pack_group(items: list[ScheduledRequest], requests: dict[str, Request], family: str,
               conf_dtype: torch.dtype, gen_width: int) -> GroupPlan:
    """One pass over the group's rows -> the packed meta; widths from per-row lists (scalar
    work stays in Python: a small numpy reduction costs more than a `max` over 64 ints)."""
    kind = items[0].kind
    policies = tuple(dict.fromkeys(i.policy for i in items))
    index = {name: i for i, name in enumerate(policies)}
    dream = family == "dream"
    flat, counts, q_lens, kv_lens, spans, bits = [], [], [], [], [], 0
    for it in items:
        req = requests[it.request_id]
        bits |= req.sampler_flags if req.sampler_flags >= 0 else row_flags(req)
        counts.append(it.num_candidates)
        q_lens.append(it.q_len)
        kv_lens.append(it.kv_len)
        end = it.cand_start + 1 if it.force_position is not None else it.cand_end
        spans.append(end - it.cand_start)
        flat.extend((it.slot, it.q_start, it.q_len, it.kv_len, it.cand_start, end, it.k,
                     it.quota, req.nfe, req.block_start, req.prompt_len, index[it.policy],
                     CONF_ALGS[it.conf_alg] if dream else -1, it.schedule_step))
    n_max, lq, kv_max = max(1, max(counts)), max(q_lens), max(kv_lens)
    lk = lq if kind == FULL or (kind == HYBRID and items[0].policy != "apd_cached") else kv_max
    packed = np.concatenate((np.array(flat, dtype=np.float64),    # HYBRID without the drafter
                             dense_index(np.array(counts), n_max)))   # cache: keys = window
    meta = packed[:len(flat)].reshape(len(items), len(META))
    facts = GroupFacts(
        family=family, policies=policies, sampled=bool(bits & SAMPLED),
        random_remask=bool(bits & RANDOM_REMASK), logits_eos_inf=bool(bits & LOGITS_EOS_INF),
        conf_eos_eot_inf=bool(bits & CONF_EOS_EOT_INF), top_p=bool(bits & TOP_P),
        top_k=bool(bits & TOP_K), conf_algs=frozenset(flat[M["conf_alg"]::len(META)]),
        conf_dtype=conf_dtype)
    full = kv_max == lk == min(kv_lens)
    return GroupPlan(
        items=items, kind=kind, lq=lq, lk=lk, lc=max(spans), n_max=n_max, gen_width=gen_width,
        needs_mask=not full, revocable=policies == ("wino",), stateful=policies == ("klass",),
        passthrough=kind == REFRESH and full and all(i.q_start == 0 and i.q_len == lk
                                                     for i in items),
        facts=facts, meta=torch.from_numpy(meta), packed=torch.from_numpy(packed))


def dense_index(counts: np.ndarray, n_max: int) -> np.ndarray:
    """(N,) float64 flat indices into the (B, n_max) candidate layout of the real candidates
    (row b's first counts[b] slots, N = sum(counts)): the sampler's vocabulary work then runs
    over N rows, not B * n_max (half of them padding when the rows' blocks are staggered).
    The host's counts are the scheduler's mask counters, which the device agrees with."""
    counts = np.minimum(counts, n_max)
    first = np.arange(len(counts)) * n_max - (np.cumsum(counts) - counts)   # b * n_max - e_b
    return (first.repeat(counts) + np.arange(int(counts.sum()))).astype(np.float64)


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
    dense: Tensor | None = None   # (N,) float64 (exact ints) flat B * n index of the real candidates


# Columns that fix a row's window, candidate range and generation span: every step of a block
# repeats them (a dual / prefix cache block's later steps), so what they alone determine on the
# device is built at the block's first such step and then reused (`Window`)
WINDOW = ("slot", "q_start", "q_len", "kv_len", "cand_start", "cand_end", "block_start",
          "prompt_len")
WINDOW_COLS = [M[name] for name in WINDOW]


@dataclass
class Window:
    """The device inputs a group's windows alone determine (never written after they are built)."""
    slot: Tensor              # (B,) int64 the rows' InputBatch slots
    base: Tensor              # (B, 1) int64 flat offset of each slot's canvas row
    q_start: Tensor           # (B, 1) int64
    block_start: Tensor       # (B, 1) int64
    positions: Tensor         # (B, Lq) int64 absolute RoPE positions
    ids_flat: Tensor          # (B, Lq) int64 flat canvas index of the window's tokens
    attn_mask: Tensor | None  # (B, 1, 1, Lk) bool, None when every row is full
    kv: object                # PagedKV | PagedAttention | None
    range_pos: Tensor         # (B, Lc) int64 canvas positions cand_start + j
    range_flat: Tensor        # (B, Lc) int64 their flat canvas index (past the canvas: dump)
    in_range: Tensor          # (B, Lc) bool j < cand_end - cand_start
    gen_flat: Tensor          # (B, W) int64 flat canvas index of the generation positions
    table: Tensor             # (B, len(KNOBS)) float64 the rows' knob table rows
    seeds: Tensor             # (B,) int64


class WindowCache:
    """Windows of the last steps' groups by their window columns and widths. An admission
    rewrites slot rows (canvas, page table, knobs), so the engine clears it then."""
    LIMIT = 16                # a step has a few groups; a block's refresh key never recurs

    def __init__(self):
        self._windows: dict[tuple, Window] = {}
        self.hits = self.builds = 0

    def clear(self) -> None:
        self._windows.clear()

    def get(self, g: GroupPlan, batch: InputBatch, pool: KVPool | None, im: Tensor) -> Window:
        key = (g.kind, g.items[0].policy, g.lq, g.lk, g.lc, g.gen_width, g.needs_mask,
               g.passthrough, g.meta.numpy()[:, WINDOW_COLS].tobytes())
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= self.LIMIT:
                self._windows.clear()
            w = self._windows[key] = build_window(g, batch, pool, im)
            self.builds += 1
        else:
            self.hits += 1
        return w


def build_window(g: GroupPlan, batch: InputBatch, pool: KVPool | None, im: Tensor) -> Window:
    dev = batch.device
    col = lambda name: im[:, M[name]]                                # noqa: E731
    slot, q_start, start = col("slot"), col("q_start"), col("cand_start")
    base = (slot * batch.row_len)[:, None]                           # (B, 1) flat row offset
    ar = torch.arange(max(g.lq, g.lk, g.lc, g.gen_width), device=dev)
    positions = q_start[:, None] + ar[:g.lq]                         # (B, Lq)
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
    range_pos = start[:, None] + ar[:g.lc]                           # (B, Lc)
    gen_pos = (col("prompt_len")[:, None] + ar[:g.gen_width]).clamp(max=batch.max_len)
    return Window(
        slot=slot, base=base, q_start=q_start[:, None], block_start=col("block_start")[:, None],
        positions=positions, ids_flat=base + positions.clamp(max=batch.max_len),
        attn_mask=attn_mask, kv=kv, range_pos=range_pos,
        range_flat=base + range_pos.clamp(max=batch.max_len),
        in_range=ar[:g.lc] < (col("cand_end") - start)[:, None], gen_flat=base + gen_pos,
        table=batch.knobs[slot], seeds=batch.seeds[slot])


def expand_group(g: GroupPlan, batch: InputBatch, pool: KVPool | None, spec: ModelSpec,
                 windows: WindowCache | None = None) -> GroupInputs:
    """The group's device inputs: its window (cached across a block's steps) and what the
    canvas decides this step: the window's tokens and the candidates."""
    buf = to_device(g.packed, batch.device)                          # the group's one H2D copy
    size = g.meta.numel()
    m = buf[:size].view(g.meta.shape)
    im = m.long()
    w = (windows or WindowCache()).get(g, batch, pool, im)
    flat = batch.flat_canvas
    cand_pos = _candidates(g, w, batch)
    rows = offset = cand_pos - w.q_start
    if spec.logits_shift:                    # Dream: row r - 1 predicts position r (r > 0)
        rows = rows - (rows > 0).to(rows.dtype)
    valid = cand_pos != batch.max_len
    return GroupInputs(
        input_ids=flat[w.ids_flat], positions=w.positions, attn_mask=w.attn_mask, kv=w.kv,
        logits_index=rows.clamp(min=0, max=g.lq - 1), cand_offset=offset.clamp(min=0, max=g.lq),
        cand_flat=w.base + cand_pos, in_block=cand_pos >= w.block_start, gen_flat=w.gen_flat,
        slot=w.slot,
        knobs=RowKnobs(table=w.table, col=COL, meta=m, imeta=im, meta_col=M,
                       seeds=w.seeds, positions=cand_pos, valid=valid),
        dense=buf[size:])


def _candidates(g: GroupPlan, w: Window, batch: InputBatch) -> Tensor:
    """The masked positions of each row's range, in order, left-compacted into (B, n_max)
    (padding: the dump column) by a cumsum and one scatter (no `nonzero`)."""
    dump = batch.max_len
    is_cand = w.in_range
    if not g.revocable:                   # WINO: committed block positions stay candidates
        is_cand = is_cand & (batch.flat_canvas[w.range_flat] == batch.mask_id)
    target = torch.where(is_cand, (is_cand.cumsum(1) - 1).clamp_(max=g.n_max), g.n_max)
    out = torch.full((len(g.items), g.n_max + 1), dump, dtype=torch.long, device=batch.device)
    out.scatter_(1, target, w.range_pos)  # the rest all land in the spare last column
    return out[:, :g.n_max]
