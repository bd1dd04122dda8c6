"""`PagedKV`: the engine's KV hook, a batched Fast-dLLM prefix / dual cache over the page pool.

For batch row b with query window [q_start_b, q_start_b + q_len_b) of a canvas of kv_len_b
positions, the queries attend to canvas positions [0, kv_len_b): this forward's fresh K/V inside
the window, the pool's K/V (written by the block's refresh forward) outside it. That is
`models.kv_hooks.PrefixKV` when the window runs to the canvas end and `DualKV` when it is the
block, with keys kept in canvas order. Refresh rows also write their fresh K/V into the pool.
Keys past kv_len_b are padding, hidden by the attention bias the runner builds.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kv_pool import KVPool


class PagedKV:
    def __init__(self, pool: KVPool, read_slots: Tensor, fresh_index: Tensor, use_fresh: Tensor,
                 write_slots: Tensor | None, write_rows: Tensor | None, passthrough: bool):
        self.pool = pool
        self.read_slots = read_slots      # (B, Lk) int64: pool slot of canvas position p (0 for padding)
        self.fresh_index = fresh_index    # (B, Lk) int64: query row holding position p (clamped)
        self.use_fresh = use_fresh        # (B, Lk) bool: p inside the row's query window
        self.write_slots = write_slots    # (N,) int64: slots of the fresh positions to store
        self.write_rows = write_rows      # (N,) int64: flat (b * Lq + j) rows of those positions
        self.passthrough = passthrough    # every row's window is its whole canvas: keys == fresh

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H_kv, Lq, D) after RoPE -> (B, H_kv, Lk, D)."""
        if self.write_slots is not None:
            self.pool.write(layer, self.write_slots, _rows(k, self.write_rows),
                            _rows(v, self.write_rows))
        if self.passthrough:
            return k, v
        ck, cv = self.pool.gather(layer, self.read_slots)
        idx = self.fresh_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        sel = self.use_fresh[:, None, :, None]
        return (torch.where(sel, k.gather(2, idx), ck.to(k.dtype)),
                torch.where(sel, v.gather(2, idx), cv.to(v.dtype)))


def _rows(x: Tensor, flat_rows: Tensor) -> Tensor:
    """(B, H, Lq, D) -> (N, H, D): the fresh positions named by flat (b * Lq + j) indices."""
    b, h, lq, d = x.shape
    return x.transpose(1, 2).reshape(b * lq, h, d).index_select(0, flat_rows)


def build_paged_kv(pool: KVPool, windows: list[tuple[int, int, int, bool]],
                   page_tables: list[list[int]], lq: int, lk: int, device) -> PagedKV:
    """windows: per row (q_start, q_len, kv_len, write); page_tables: per row page ids.

    Index tensors are built on the host and moved once (one copy per step, no per-row sync)."""
    ps = pool.page_size
    read = torch.zeros(len(windows), lk, dtype=torch.long)
    fresh = torch.zeros(len(windows), lk, dtype=torch.long)
    use = torch.zeros(len(windows), lk, dtype=torch.bool)
    w_slots, w_rows = [], []
    pos = torch.arange(lk)
    for b, ((q0, ql, kvl, write), pages) in enumerate(zip(windows, page_tables)):
        table = torch.tensor(pages, dtype=torch.long)
        p = pos[:kvl]
        read[b, :kvl] = table[p // ps] * ps + p % ps
        fresh[b] = (pos - q0).clamp(0, lq - 1)
        use[b, q0:q0 + ql] = True
        if write:
            w_slots.append(read[b, q0:q0 + ql])
            w_rows.append(torch.arange(ql) + b * lq)
    passthrough = all(q0 == 0 and ql == kvl for q0, ql, kvl, _ in windows) and lq == lk
    to = dict(device=device, non_blocking=True)
    return PagedKV(pool, read.to(**to), fresh.to(**to), use.to(**to),
                   torch.cat(w_slots).to(**to) if w_slots else None,
                   torch.cat(w_rows).to(**to) if w_rows else None, passthrough)
