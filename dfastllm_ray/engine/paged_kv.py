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
whole canvas is passed through unchanged. Keys past kv_len_b are padding, hidden by the attention
mask the runner builds; padded query rows write to the pool's dump slot.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kv_pool import KVPool


class PagedKV:
    def __init__(self, pool: KVPool, read_slots: Tensor, write_slots: Tensor, passthrough: bool):
        self.pool = pool
        self.read_slots = read_slots      # (B, Lk) int64: pool slot of canvas position p
        self.write_slots = write_slots    # (B * Lq,) int64: slot of each query row (padding: dump)
        self.passthrough = passthrough    # every window is its whole canvas: keys == this forward's

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H_kv, Lq, D) after RoPE -> (B, H_kv, Lk, D)."""
        self.pool.write(layer, self.write_slots, _rows(k), _rows(v))
        if self.passthrough:
            return k, v
        ck, cv = self.pool.gather(layer, self.read_slots)
        return ck.to(k.dtype), cv.to(v.dtype)


def _rows(x: Tensor) -> Tensor:
    """(B, H, Lq, D) -> (B * Lq, H, D), rows in (b, j) order."""
    b, h, lq, d = x.shape
    return x.transpose(1, 2).reshape(b * lq, h, d)


def build_paged_kv(pool: KVPool, page_rows: Tensor, q_start: Tensor, q_len: Tensor, lq: int,
                   lk: int, passthrough: bool) -> PagedKV:
    """Slots from the device page tables, no host work per row.

    page_rows (B, max_pages) int64: each row's page table; q_start, q_len (B,) int64 on the
    device. Keys past a row's kv_len map to whatever its table holds there (hidden by the
    attention mask); query rows past q_len write to the dump slot, so they never overwrite a
    cached position."""
    ps = pool.page_size
    page_of, offset, ar = pool.position_tables(max(lk, lq))
    page_of = page_of[:lk].clamp(max=page_rows.shape[1] - 1)
    read = page_rows[:, page_of] * ps + offset[:lk]                              # (B, Lk)
    j = ar[:lq]
    qpos = (q_start[:, None] + j).clamp_(max=lk - 1)                            # (B, Lq)
    write = torch.where(j < q_len[:, None], read.gather(1, qpos), pool.dump_slot)
    return PagedKV(pool, read, write.reshape(-1), passthrough)
