"""`PagedAttention`: the KV hook that attends over the page pool in place (FlexAttention).

Same semantics as `PagedKV` (Fast-dLLM prefix / dual cache, batched): each layer writes the
window's fresh K/V into the request's pages, then row b's queries attend to its canvas keys
[0, kv_len_b). `PagedKV` gathers those keys into a dense (B, H_kv, Lk, D) copy per layer;
this hook instead hands FlexAttention the whole pool as one key sequence of `num_pages *
page_size` slots (a view, no copy) and a block mask saying which slots each row may read.

The block mask is built directly from the page tables (vLLM's FlexAttention "direct build"),
once per forward group and shared by every layer. One flex KV block is one page: row b's
blocks are its first kv_len_b // page_size pages ("full": no mask_mod inside) plus the page
holding position kv_len_b - 1 when kv_len_b is not a page multiple ("partial": mask_mod
applied). The kernel only ever loads those pages. `mask_mod` is the element-level truth:
    page = kv // ps, lp = logical[page]            # canvas page index the page holds
    attend = lp >= 0 & page_rows[b, lp] == page & lp * ps + kv % ps < kv_len_b
It checks membership through the row's own page table, so a prompt page shared by several
requests (prefix caching, always at the same canvas page index) is visible to all of them.
On CPU flex runs eagerly and evaluates mask_mod over every (query, pool slot) pair (slow: tiny
shapes only); on CUDA it is compiled and visits only the listed pages.
"""
from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..models.layers import attention
from .kv_pool import KVPool, to_device

# Query rows per flex Q block. All query rows of a batch row read the same pages, so this only
# sets the kernel's query tiling (the kernel's BLOCK_M must divide it; its defaults do).
Q_BLOCK = 128


class PageMap:
    """logical[page] = the canvas page index page `page` holds for the request(s) using it.

    Written at admission; never cleared: a stale entry is harmless because `mask_mod` also
    checks that the row's page table holds the page at that index, and a page reallocated to
    another request is rewritten by that request's admission. Shared prefix pages sit at the
    same canvas index in every request, so one entry serves all of them."""

    def __init__(self, num_pages: int, page_size: int, device: torch.device | str):
        kernel_options(torch.device(device).type, page_size)     # a bad page_size fails here
        self.logical = torch.full((num_pages,), -1, dtype=torch.long, device=device)

    def admit(self, page_ids: list[int]) -> None:
        """The request's page table (canvas page i -> page_ids[i]): one host -> device copy."""
        if not page_ids:
            return
        rows = torch.tensor([page_ids, list(range(len(page_ids)))], dtype=torch.long)
        rows = to_device(rows, self.logical.device)
        self.logical.index_copy_(0, rows[0], rows[1])


class PagedAttention:
    def __init__(self, pool: KVPool, write_slots: Tensor, block_mask: BlockMask,
                 passthrough: bool):
        self.pool = pool
        self.write_slots = write_slots    # (B * Lq,) int64: slot of each query row (padding: dump)
        self.block_mask = block_mask      # rows x pool slots, shared by every layer
        self.passthrough = passthrough    # every window is its whole canvas: keys == this forward's

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q (B, H, Lq, D), k, v (B, H_kv, Lq, D) after RoPE -> (B, H, Lq, D).

        `bias` is the runner's key mask (keys < kv_len_b); the block mask already says the
        same, so only the passthrough path (plain SDPA over this forward's K/V) uses it."""
        self.pool.write(layer, self.write_slots, _rows(k), _rows(v))
        if self.passthrough:
            return attention(q, k, v, bias)
        ck, cv = pool_keys(self.pool, layer)                          # (1, H_kv, N, D) views
        out = _flex(q.device.type)(q.to(ck.dtype), ck, cv, block_mask=self.block_mask,
                                   enable_gqa=q.shape[1] != ck.shape[1],
                                   kernel_options=kernel_options(q.device.type,
                                                                 self.pool.page_size))
        return out.to(q.dtype)


def pool_keys(pool: KVPool, layer: int) -> tuple[Tensor, Tensor]:
    """The layer's K and V over every page slot (dump slot excluded), (1, H_kv, N, D) views."""
    n = pool.dump_slot
    return (pool.data[layer, 0, :n].transpose(0, 1)[None],
            pool.data[layer, 1, :n].transpose(0, 1)[None])


def _rows(x: Tensor) -> Tensor:
    """(B, H, Lq, D) -> (B * Lq, H, D), rows in (b, j) order."""
    b, h, lq, d = x.shape
    return x.transpose(1, 2).reshape(b * lq, h, d)


@cache
def _flex(device_type: str):
    """Eager flex on CPU (the tests); compiled once per process on CUDA, where the eager
    fallback would materialise (B, H, Lq, pool slots) scores."""
    if device_type != "cuda":
        return flex_attention
    return torch.compile(flex_attention, fullgraph=True)


def kernel_options(device_type: str, page_size: int) -> dict | None:
    """The Triton kernel's KV tile must divide a flex KV block (= one page); the flex-decoding
    kernel, which a short window would otherwise get, has its own tiling, so ask for TRITON."""
    if device_type != "cuda":
        return None
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"EngineConfig.page_size={page_size} is invalid for "
                         'attention_backend="flex" on CUDA: use a power of two >= 16 (one page is '
                         "one kernel KV tile)")
    return {"BACKEND": "TRITON", "BLOCK_N": min(page_size, 64)}


def paged_block_mask(page_map: PageMap, page_rows: Tensor, kv_len: Tensor, page_size: int,
                     lq: int, lk: int) -> BlockMask:
    """Rows x pool slots from the page tables, without a dense (B, Lq, N) mask.

    page_rows (B, max_pages) int64, kv_len (B,) int64 on the device; lk = max kv_len."""
    ps, b = page_size, page_rows.shape[0]
    n_pages = page_map.logical.shape[0]
    width = min(math.ceil(lk / ps), page_rows.shape[1])              # pages any row may read
    nqb = math.ceil(lq / Q_BLOCK)
    n_full = kv_len // ps                                             # (B,) whole pages
    part = page_rows.gather(1, n_full.clamp(max=page_rows.shape[1] - 1)[:, None])   # (B, 1)

    def blocks(idx: Tensor, num: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n) page ids, (B,) counts -> flex's (B, 1, nqb), (B, 1, nqb, n) int32."""
        num = num.to(torch.int32)[:, None, None].expand(b, 1, nqb)
        idx = idx.to(torch.int32)[:, None, None, :].expand(b, 1, nqb, idx.shape[1])
        return num.contiguous(), idx.contiguous()

    part_n, part_idx = blocks(part, (kv_len % ps != 0).long())
    full_n, full_idx = blocks(page_rows[:, :width], n_full)
    return BlockMask.from_kv_blocks(
        part_n, part_idx, full_n, full_idx, BLOCK_SIZE=(Q_BLOCK, ps),
        mask_mod=_mask_mod(page_map.logical, page_rows, kv_len, ps),
        seq_lengths=(lq, n_pages * ps), compute_q_blocks=False)


def _mask_mod(logical: Tensor, page_rows: Tensor, kv_len: Tensor, ps: int):
    def mask_mod(b, h, q_idx, kv_idx):
        page = kv_idx // ps
        lp = logical[page]
        own = page_rows[b, lp.clamp(min=0)] == page
        return (lp >= 0) & own & (lp * ps + kv_idx % ps < kv_len[b])
    return mask_mod


def build_paged_attention(pool: KVPool, page_map: PageMap, page_rows: Tensor, q_start: Tensor,
                          q_len: Tensor, kv_len: Tensor, lq: int, lk: int,
                          passthrough: bool) -> PagedAttention:
    """`build_paged_kv`'s write slots plus the block mask (no dense read slots).

    Query rows past q_len write to the dump slot, so they never overwrite a cached position."""
    ps = pool.page_size
    j = torch.arange(lq, device=page_rows.device)
    qpos = (q_start[:, None] + j).clamp_(max=lk - 1)                            # (B, Lq)
    slot = page_rows.gather(1, qpos // ps) * ps + qpos % ps
    write = torch.where(j < q_len[:, None], slot, pool.dump_slot).reshape(-1)
    mask = None if passthrough else paged_block_mask(page_map, page_rows, kv_len, ps, lq, lk)
    return PagedAttention(pool, write, mask, passthrough)
