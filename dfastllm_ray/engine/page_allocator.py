"""`PageAllocator`: which KV pages belong to whom (pure Python bookkeeping, no tensors).

Pages come from a free list. With prefix caching, a page holding a *full, committed prompt
page* is published under a content-hash chain key (the hash of the page's tokens and of the
key of the page before it, so a key names the whole prefix up to the page's end). Later
requests whose prompt starts with the same tokens reuse the published pages (reference
counted). A cached page nobody references stays in an LRU list and is evicted (its key
forgotten) only when the free list runs dry.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


def page_hash_chain(token_ids: list[int], page_size: int, num_pages: int) -> list[bytes]:
    """Keys of the first `num_pages` full pages of `token_ids`: key_i = H(key_{i-1} || page_i)."""
    keys, parent = [], b""
    for i in range(num_pages):
        page = array("q", token_ids[i * page_size:(i + 1) * page_size]).tobytes()
        parent = hashlib.sha256(parent + page).digest()
        keys.append(parent)
    return keys


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_pages))      # never used or uncached, refcount 0
        self._refcount = [0] * num_pages
        self._key_of: dict[int, bytes] = {}                     # published page -> its key
        self._page_of: dict[bytes, int] = {}                    # key -> published page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # published, refcount 0; oldest first
        self.prefix_queries = 0      # prompt pages looked up in the prefix cache (admitted requests)
        self.prefix_hits = 0         # ... of which were found

    # ---- capacity ---------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages an allocation may take now: free ones plus unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        return len(self._key_of)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def match(self, keys: list[bytes]) -> list[int]:
        """Published pages for the longest leading run of `keys` (no side effects)."""
        if not self.enable_prefix_caching:
            return []
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_allocate(self, num_pages: int, keys: list[bytes] = ()) -> bool:
        hit = self.match(list(keys))
        reusable_idle = sum(1 for p in hit if self._refcount[p] == 0)
        return self.num_free_pages - reusable_idle >= num_pages - len(hit)

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, num_pages: int, keys: list[bytes] = ()) -> tuple[list[int], int]:
        """Pages for a new request: the cached pages matching its leading `keys` first, then
        fresh ones. Returns (page ids in canvas order, number of leading pages that were hits)."""
        if not self.can_allocate(num_pages, keys):
            raise RuntimeError(f"PageAllocator: {num_pages} pages requested, "
                               f"{self.num_free_pages} free (check can_allocate first)")
        hit = self.match(list(keys))
        if self.enable_prefix_caching:
            self.prefix_queries += len(keys)
            self.prefix_hits += len(hit)
        for page in hit:
            self._evictable.pop(page, None)
            self._refcount[page] += 1
        fresh = [self._take_fresh() for _ in range(num_pages - len(hit))]
        return hit + fresh, len(hit)

    def _take_fresh(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:                                   # evict the least recently released cached page
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
        self._refcount[page] = 1
        return page

    def publish(self, pages: list[int], keys: list[bytes]) -> int:
        """Offer a request's full prompt pages (K/V now written) to the prefix cache. A key that
        is already published keeps its page; this request's copy stays private. Returns the
        number of pages newly published."""
        if not self.enable_prefix_caching:
            return 0
        added = 0
        for page, key in zip(pages, keys):
            if key in self._page_of or page in self._key_of:
                continue
            self._page_of[key] = page
            self._key_of[page] = key
            added += 1
        return added

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page (a request finished or was aborted). A published page
        whose count reaches 0 becomes evictable (most recently used); others return to the free
        list."""
        for page in pages:
            if self._refcount[page] <= 0:
                raise RuntimeError(f"PageAllocator: page {page} freed twice")
            self._refcount[page] -= 1
            if self._refcount[page]:
                continue
            if page in self._key_of:
                self._evictable[page] = None
            else:
                self._free.append(page)

    def stats(self) -> dict:
        return {"num_pages": self.num_pages, "free_pages": self.num_free_pages,
                "cached_pages": self.num_cached_pages, "prefix_queries": self.prefix_queries,
                "prefix_hits": self.prefix_hits, "prefix_hit_rate": self.hit_rate}
