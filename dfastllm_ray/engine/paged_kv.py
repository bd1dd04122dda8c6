"""`PagedKV`: the engine's KV hook, a batched Fast-dLLM prefix / dual cache over the page pool.

For batch row b with query window [q_start_b, q_start_b + q_len_b) of a canvas of kv_len_b
positions, the queries attend to canvas positions [0, kv_len_b): this forward's fresh K/V inside
the window, the pool's K/V (written by the block's refresh forward) outside it. That is
`models.kv_hooks.PrefixKV` when the window runs to the canvas end and `DualKV` when it is the
block, keys kept in canvas order.

Each layer first writes the window's fresh K/V into the request's pages, then gathers the whole
canvas from the pool: Fast-dLLM's dual cache writes the block in place the same way. It is safe
because nothing outside the window is touched, and every position inside it is rewritten before
it is read again (the next step of the block recomputes the same window; the next block starts
with a refresh that rewrites everything from its q_start). A refresh row whose window is the
whole canvas is passed through unchanged. Keys past kv_len_b are padding (slot 0), hidden by the
attention bias the runner builds.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kv_pool import KVPool, to_device


class PagedKV:
    def __init__(self, pool: KVPool, read_slots: Tensor, write_slots: Tensor, write_rows: Tensor,
                 passthrough: bool):
        self.pool = pool
        self.read_slots = read_slots      # (B, Lk) int64: pool slot of canvas position p (0: padding)
        self.write_slots = write_slots    # (N,) int64: slots of the window positions of every row
        self.write_rows = write_rows      # (N,) int64: flat (b * Lq + j) query rows of those positions
        self.passthrough = passthrough    # every window is its whole canvas: keys == this forward's

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H_kv, Lq, D) after RoPE -> (B, H_kv, Lk, D)."""
        self.pool.write(layer, self.write_slots, _rows(k, self.write_rows), _rows(v, self.write_rows))
        if self.passthrough:
            return k, v
        ck, cv = self.pool.gather(layer, self.read_slots)
        return ck.to(k.dtype), cv.to(v.dtype)


def _rows(x: Tensor, flat_rows: Tensor) -> Tensor:
    """(B, H, Lq, D) -> (N, H, D): the fresh positions named by flat (b * Lq + j) indices."""
    b, h, lq, d = x.shape
    return x.transpose(1, 2).reshape(b * lq, h, d).index_select(0, flat_rows)


def build_paged_kv(pool: KVPool, windows: list[tuple[int, int, int]], page_tables: list[list[int]],
                   lq: int, lk: int, device) -> PagedKV:
    """windows: per row (q_start, q_len, kv_len); page_tables: per row page ids in canvas order.

    Index tensors are built on the host and moved once (one copy per step, no per-row sync)."""
    ps = pool.page_size
    read = torch.zeros(len(windows), lk, dtype=torch.long)
    w_slots, w_rows = [], []
    pos = torch.arange(lk)
    for b, ((q0, ql, kvl), pages) in enumerate(zip(windows, page_tables)):
        table = torch.tensor(pages, dtype=torch.long)
        p = pos[:kvl]
        read[b, :kvl] = table[p // ps] * ps + p % ps
        w_slots.append(read[b, q0:q0 + ql])
        w_rows.append(torch.arange(ql) + b * lq)
    passthrough = lq == lk and all(q0 == 0 and ql == kvl for q0, ql, kvl in windows)
    return PagedKV(pool, to_device(read, device), to_device(torch.cat(w_slots), device),
                   to_device(torch.cat(w_rows), device), passthrough)
