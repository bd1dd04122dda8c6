"""A forward group's inputs: packed on the host in one tensor, expanded on the device by index ops.

The host knows, per scheduled request, a handful of integers (slot, window, candidate range,
quota, step): `pack_group` puts them in one (B, META) int64 tensor, which goes to the device in
one copy. `expand_group` derives everything else there from the `InputBatch`: the window's token
ids (a gather from the resident canvas), RoPE positions, the key mask (only when some row is
shorter than the padded width), the paged KV slots, the candidates (the masked positions of each
row's range, found left to right by a cumsum and a searchsorted: no `nonzero`) and the LM-head
rows. What the window alone fixes is built at a block's first step and reused while the block's
steps repeat it (`Window`), so a cached step's expansion is seven ops whatever its batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..models.spec import ModelSpec
from ..sampling.batch import GroupFacts, RowKnobs
from .input_batch import COL, CONF_ALGS, InputBatch
from .kv_pool import KVPool, to_device
from .outputs import FULL, HYBRID, REFRESH, ScheduledRequest
from .paged_attention import build_paged_attention
from .paged_kv import PagedKV
from .request import Request

# Columns of the packed per-row metadata (int64; "quota" holds the bits of a float64: Dream
# origin's probability, read on the device by a dtype view)
META = ("slot", "q_start", "q_len", "kv_len", "cand_start", "cand_end", "block_start",
        "prompt_len", "span", "k", "quota", "step", "policy", "conf_alg", "block_step")
M = {name: i for i, name in enumerate(META)}
# The first columns fix a row's window, candidate range and generation span: every step of a
# block repeats them (a dual / prefix cache block's later steps), so what they alone determine
# on the device is built at the block's first such step and then reused (`Window`)
WINDOW_COLS = M["span"] + 1
QUOTA = M["quota"]


@dataclass
class GroupPlan:
    """Host side of one forward group (no device data but the packed meta)."""
    items: list[ScheduledRequest]
    kind: str
    lq: int                   # padded query width
    lk: int                   # padded key width
    lc: int                   # widest candidate range (at least n_max)
    n_max: int                # most candidates of a row (LM-head rows per row)
    gen_width: int            # generation positions copied back per row
    needs_mask: bool          # some row's keys are shorter than lk
    revocable: bool           # WINO: candidates are every block position, a shadow follows
    stateful: bool            # KLASS: per-position state across steps (engine/stateful.py)
    passthrough: bool         # every row's window is its whole canvas (refresh from 0)
    in_block: bool            # every row's candidate range starts at its active block
    block_causal: bool        # block diffusion, a window over several blocks (a prefill, a fused
                              # store + denoise): a query sees its block and the earlier ones
    facts: GroupFacts
    meta: Tensor              # (B, len(META)) int64 on the host: a view of `packed`
    packed: Tensor            # (B * len(META) + N,) int64: meta, then the dense index (one H2D copy)
    dense: bool               # `packed` carries the dense index (some row has fewer than n_max)


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
    flat, quotas, counts, q_lens, kv_lens, spans, bits = [], [], [], [], [], [], 0
    in_block = True
    for it in items:
        req = requests[it.request_id]
        bits |= req.sampler_flags if req.sampler_flags >= 0 else row_flags(req)
        counts.append(it.num_candidates)
        q_lens.append(it.q_len)
        kv_lens.append(it.kv_len)
        quotas.append(it.quota)
        end = it.cand_start + 1 if it.force_position is not None else it.cand_end
        spans.append(end - it.cand_start)
        in_block = in_block and it.cand_start >= req.block_start
        flat.extend((it.slot, it.q_start, it.q_len, it.kv_len, it.cand_start, end,
                     req.block_start, req.prompt_len, end - it.cand_start, it.k, 0, req.nfe,
                     index[it.policy], CONF_ALGS[it.conf_alg] if dream else -1,
                     it.schedule_step))
    b, n_max, lq, kv_max = len(items), max(1, max(counts)), max(q_lens), max(kv_lens)
    lk = lq if kind == FULL or (kind == HYBRID and items[0].policy != "apd_cached") else kv_max
    meta = np.array(flat, dtype=np.int64).reshape(b, len(META))    # HYBRID without the drafter
    if "dream_origin" in index:                                        # cache: keys = window
        meta[:, QUOTA] = np.array(quotas, dtype=np.float64).view(np.int64)
    dense = sum(counts) != b * n_max           # no padding slot: the padded layout is dense
    packed = np.concatenate((meta.reshape(-1), dense_index(np.array(counts), n_max))) \
        if dense else meta.reshape(-1)
    facts = group_facts(family, policies, bits, frozenset(flat[M["conf_alg"]::len(META)]),
                        conf_dtype, dense)
    full = kv_max == lk == min(kv_lens)
    return GroupPlan(
        items=items, kind=kind, lq=lq, lk=lk, lc=max(max(spans), n_max), n_max=n_max,
        gen_width=gen_width, needs_mask=not full, revocable=policies == ("wino",),
        stateful=policies == ("klass",),
        passthrough=kind == REFRESH and full and all(i.q_start == 0 and i.q_len == lk
                                                     for i in items),
        in_block=in_block, block_causal=family == "sdar" and spans_blocks(items, requests),
        facts=facts,
        meta=torch.from_numpy(meta),
        packed=torch.from_numpy(packed), dense=dense)


def spans_blocks(items: list[ScheduledRequest], requests: dict[str, Request]) -> bool:
    """Block diffusion: does some row's window reach over more than one block (a prefill, a
    fused store + denoise)? Then the window needs the block-causal mask."""
    for it in items:
        b = requests[it.request_id].params.block_length
        if it.q_len and it.q_start // b != (it.q_start + it.q_len - 1) // b:
            return True
    return False


_FACTS: dict[tuple, GroupFacts] = {}


def group_facts(family: str, policies: tuple, bits: int, conf_algs: frozenset,
                conf_dtype: torch.dtype, padded: bool) -> GroupFacts:
    """The group's `GroupFacts`, one shared record per distinct combination (few: the engine's
    policies times the flag bits; the sampler only reads them)."""
    key = (family, policies, bits, conf_algs, conf_dtype, padded)
    facts = _FACTS.get(key)
    if facts is None:
        facts = _FACTS[key] = GroupFacts(
            family=family, policies=policies, sampled=bool(bits & SAMPLED),
            random_remask=bool(bits & RANDOM_REMASK), logits_eos_inf=bool(bits & LOGITS_EOS_INF),
            conf_eos_eot_inf=bool(bits & CONF_EOS_EOT_INF), top_p=bool(bits & TOP_P),
            top_k=bool(bits & TOP_K), conf_algs=conf_algs, conf_dtype=conf_dtype,
            padded=padded)
    return facts


def dense_index(counts: np.ndarray, n_max: int) -> np.ndarray:
    """(N,) int64 flat indices into the (B, n_max) candidate layout of the real candidates
    (row b's first counts[b] slots, N = sum(counts)): the sampler's vocabulary work then runs
    over N rows, not B * n_max (half of them padding when the rows' blocks are staggered).
    The host's counts are the scheduler's mask counters, which the device agrees with."""
    return np.flatnonzero(np.arange(n_max) < counts[:, None])       # row-major: row by row


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
    in_block: Tensor | None   # (B, n) bool candidate lies in the active block; None: all do
    gen_flat: Tensor          # (B, W) int64 flat canvas index of the generation positions
    slot: Tensor              # (B,) int64 the rows' InputBatch slots
    knobs: RowKnobs
    dense: Tensor | None = None   # (N,) int64 flat B * n index of the real candidates


# Rows of `Window.by_range`: what a candidate at range column j maps to
POS, FLAT, ROW, OFFSET = range(4)


@dataclass
class Window:
    """The device inputs a group's windows alone determine (never written after they are built)."""
    slot: Tensor              # (B,) int64 the rows' InputBatch slots
    block_start: Tensor       # (B, 1) int64
    positions: Tensor         # (B, Lq) int64 absolute RoPE positions
    ids_flat: Tensor          # (B, Lq) int64 flat canvas index of the window's tokens
    attn_mask: Tensor | None  # (B, 1, 1, Lk) bool, None when every row is full
    kv: object                # PagedKV | PagedAttention | None
    range_flat: Tensor        # (B, Lc) int64 flat canvas index of cand_start + j (past the
                              # span: dump; masks counted there come after every real one)
    targets: Tensor           # (B, Lc) int64 1..Lc: the i-th candidate is where the count hits i
    by_range: Tensor          # (4, B, Lc + 1) int64 per range column j (POS, FLAT, ROW, OFFSET)
    gen_flat: Tensor          # (B, W) int64 flat canvas index of the generation positions
    table: Tensor             # (B, len(KNOBS)) float64 the rows' knob table rows
    seeds: Tensor             # (B,) int64
    columns: Tensor           # (>= Lc + 1,) int64 0, 1, ...
    converted: dict = field(default_factory=dict)   # dtype -> `table` in it (filled on use)


class WindowCache:
    """Windows of the last steps' groups by their window columns and widths. An admission
    rewrites slot rows (canvas, page table, knobs), so the engine clears it then."""
    LIMIT = 16                # a step has a few groups; a block's refresh key never recurs

    def __init__(self):
        self._windows: dict[tuple, Window] = {}
        self.hits = self.builds = 0

    def clear(self) -> None:
        self._windows.clear()

    def get(self, g: GroupPlan, batch: InputBatch, pool: KVPool | None, im: Tensor,
            shift: bool) -> Window:
        key = (g.kind, g.items[0].policy, g.lq, g.lk, g.lc, g.gen_width, g.needs_mask,
               g.passthrough, g.block_causal, shift, g.meta.numpy()[:, :WINDOW_COLS].tobytes())
        w = self._windows.get(key)
        if w is None:
            if len(self._windows) >= self.LIMIT:
                self._windows.clear()
            w = self._windows[key] = build_window(g, batch, pool, im, shift)
            self.builds += 1
        else:
            self.hits += 1
        return w


def build_window(g: GroupPlan, batch: InputBatch, pool: KVPool | None, im: Tensor,
                 shift: bool) -> Window:
    """`shift`: the model's logit shift (Dream: row r - 1 predicts position r, r > 0). Every
    flat canvas index is `base + position` (position clamped to the dump column L)."""
    dump, ar = batch.max_len, batch.arange
    col = im.unsqueeze(2).unbind(1)                                  # (B, 1) per META column
    q_start, start = col[M["q_start"]], col[M["cand_start"]]
    slot = im.select(1, M["slot"])                                   # (B,)
    base = col[M["slot"]] * batch.row_len                            # (B, 1) flat row offset
    positions = q_start + ar(g.lq)                                   # (B, Lq)
    j = ar(g.lc + 1)
    # range column j past a row's span (and the extra last column, where searchsorted lands
    # for a missing candidate) maps to the dump: a padding slot
    pos = torch.where(j < col[M["span"]], start + j, dump)           # (B, Lc + 1)
    gen_pos = col[M["prompt_len"]] + ar(g.gen_width)                 # (B, W)
    flat = torch.cat((positions, pos, gen_pos), dim=1).clamp_(max=dump) + base
    ids_flat, pos_flat, gen_flat = flat.split((g.lq, g.lc + 1, g.gen_width), dim=1)
    offset = pos - q_start
    row = offset - offset.gt(0).long() if shift else offset
    by_range = torch.stack((pos, pos_flat, row.clamp(min=0, max=g.lq - 1),
                            offset.clamp(min=0, max=g.lq)))
    table = batch.knobs.index_select(0, slot)                        # (B, len(KNOBS))
    attn_mask = None
    if g.block_causal:
        attn_mask = _block_causal(g, batch, table, positions, col[M["kv_len"]])
    elif g.needs_mask:
        attn_mask = (ar(g.lk) < col[M["kv_len"]]).view(len(g.items), 1, 1, g.lk)
    return Window(
        slot=slot, block_start=col[M["block_start"]], positions=positions, ids_flat=ids_flat,
        attn_mask=attn_mask, kv=_window_kv(g, batch, pool, col, slot, base, ids_flat),
        range_flat=pos_flat.narrow(1, 0, g.lc), targets=batch.count_targets(len(g.items), g.lc),
        by_range=by_range, gen_flat=gen_flat,
        table=table, seeds=batch.seeds.index_select(0, slot),
        columns=batch.columns)


def _block_causal(g: GroupPlan, batch: InputBatch, table: Tensor, positions: Tensor,
                  kv_len: Tensor) -> Tensor:
    """(B, 1, Lq, Lk) bool: key j is visible to the query at position p when j < the row's
    kv_len and j's block is p's or an earlier one (blocks of the row's block_length from 0:
    SDAR's `tril(ones(nb, nb))` repeated B times), so one forward prefills many blocks."""
    blen = table.select(1, COL["block_length"]).long().view(-1, 1, 1)
    keys = batch.arange(g.lk)
    same_or_earlier = (keys // blen) <= (positions.unsqueeze(2) // blen)            # (B, Lq, Lk)
    return (same_or_earlier & (keys < kv_len).unsqueeze(1)).unsqueeze(1)


def _window_kv(g: GroupPlan, batch: InputBatch, pool: KVPool | None, col: tuple, slot: Tensor,
               base: Tensor, ids_flat: Tensor) -> object:
    """The window's KV hook: keys [0, Lk) read from the rows' pool slots, query rows written
    to theirs (padding rows past q_len: the pool's dump slot); None without a cache."""
    uses_pool = g.kind not in (FULL, HYBRID) or g.items[0].policy == "apd_cached"
    if not uses_pool:
        return None
    q_len = col[M["q_len"]]
    if batch.page_map is not None:          # attention_backend="flex": pages read in place
        return build_paged_attention(pool, batch.page_map, batch.page_table[slot],
                                     col[M["q_start"]].view(-1), q_len.view(-1),
                                     col[M["kv_len"]].view(-1), g.lq, g.lk, g.passthrough)
    slots = batch.kv_slots                   # take / put_ index any tensor as its flat view
    read = slots.take(base + batch.arange(g.lk))                     # (B, Lk)
    write = torch.where(batch.arange(g.lq) < q_len, slots.take(ids_flat),
                        pool.dump_slot)                              # (B, Lq)
    return PagedKV(pool, read, write.view(-1), g.passthrough)


def expand_group(g: GroupPlan, batch: InputBatch, pool: KVPool | None, spec: ModelSpec,
                 windows: WindowCache | None = None) -> GroupInputs:
    """The group's device inputs: its window (cached across a block's steps) and what the
    canvas decides this step: the window's tokens and the candidates."""
    im, dense = _device_meta(g, batch.device)
    w = (windows or WindowCache()).get(g, batch, pool, im, spec.logits_shift)
    j = _candidates(g, w, batch)                                     # (B, n_max)
    pos, cand_flat, rows, offset = w.by_range.gather(2, j.expand(4, -1, -1)).unbind(0)
    return GroupInputs(
        input_ids=batch.canvas.take(w.ids_flat), positions=w.positions,
        attn_mask=w.attn_mask, kv=w.kv, logits_index=rows, cand_offset=offset,
        cand_flat=cand_flat, in_block=None if g.in_block else pos >= w.block_start,
        gen_flat=w.gen_flat, slot=w.slot,
        knobs=RowKnobs(table=w.table, col=COL, meta=im, imeta=im, meta_col=M,
                       seeds=w.seeds, positions=pos, valid=pos.ne(batch.max_len),
                       columns=w.columns, all_valid=not g.dense, converted=w.converted),
        dense=dense)


def _device_meta(g: GroupPlan, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(meta (B, META), dense index (N,) or None) on the device: one H2D copy of `packed` and
    two views of it (on CPU the host tensors themselves)."""
    size = g.meta.numel()
    if device.type == "cpu":
        return g.meta, g.packed.narrow(0, size, g.packed.numel() - size) if g.dense else None
    buf = to_device(g.packed, device)                                # the group's one H2D copy
    if not g.dense:
        return buf.view(g.meta.shape), None
    return buf.narrow(0, 0, size).view(g.meta.shape), buf.narrow(0, size, buf.numel() - size)


def _candidates(g: GroupPlan, w: Window, batch: InputBatch) -> Tensor:
    """(B, n_max) int64: the range column of each row's i-th candidate, its masked positions
    in order (Lc where a row has fewer: `by_range` maps it, and any column past the row's span,
    to the dump). The running count of masks along the range reaches i + 1 first at the i-th
    candidate: a cumsum and a searchsorted (no `nonzero`, no scatter)."""
    if g.revocable:                       # WINO: every block position is a candidate
        return batch.arange(g.n_max).expand(len(g.items), g.n_max)
    count = batch.canvas.take(w.range_flat).eq(batch.mask_id).cumsum(1)   # (B, Lc)
    return torch.searchsorted(count, w.targets).narrow(1, 0, g.n_max)
