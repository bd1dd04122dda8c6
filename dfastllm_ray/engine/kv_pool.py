"""`KVPool`: one preallocated paged K/V store shared by every request.

Layout `(layers, 2, num_pages * page_size, H_kv, D)`: a page is `page_size` consecutive
*slots*; a request's canvas position p lives in slot `page_ids[p // page_size] * page_size +
p % page_size`. Keys are stored after RoPE (absolute canvas positions), so a gathered key needs
no further rotation. Allocated once from a memory budget, so requests of any length share the
device without fragmentation; which page belongs to whom is `PageAllocator`'s business.
"""
from __future__ import annotations

import torch

GIB = 1 << 30


def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """K and V of every layer for one page."""
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * page_size * num_kv_heads * head_dim * elem


def num_pages_for_budget(budget_bytes: int, page_bytes: int) -> int:
    return max(int(budget_bytes // page_bytes), 0)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> device without a host sync: pinned + non_blocking on CUDA (a plain copy
    from pageable memory would synchronise the stream)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class KVPool:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        # (layers, 2, slots + 1, H_kv, D); zeros so a never-written slot is finite under a 0
        # weight. The last slot is a dump: padded query rows write there, nothing reads it.
        self.dump_slot = num_pages * page_size
        self._tables: tuple[torch.Tensor, ...] | None = None
        self.data = torch.zeros(num_layers, 2, self.dump_slot + 1, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def position_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(page index, offset in page, position) of canvas positions 0..length-1, (L,) int64
        each, built once on the pool's device (and regrown only for a longer length)."""
        if self._tables is None or self._tables[2].shape[0] < length:
            pos = torch.arange(max(length, 1024), device=self.data.device)
            self._tables = (pos // self.page_size, pos % self.page_size, pos)
        return self._tables

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, Lk) int64 on the pool's device -> K, V each (B, H_kv, Lk, D)."""
        b, lk = slots.shape
        flat = slots.reshape(-1)
        k = self.data[layer, 0].index_select(0, flat).view(b, lk, *self.data.shape[-2:])
        v = self.data[layer, 1].index_select(0, flat).view(b, lk, *self.data.shape[-2:])
        return k.transpose(1, 2), v.transpose(1, 2)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots (N,) int64; k, v (N, H_kv, D): store one forward's new keys/values."""
        self.data[layer, 0].index_copy_(0, slots, k.to(self.data.dtype))
        self.data[layer, 1].index_copy_(0, slots, v.to(self.data.dtype))
