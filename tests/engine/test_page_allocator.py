"""Page allocator and prefix caching: free list, hash chain, refcounts, LRU eviction, hit rate."""
from __future__ import annotations

import pytest

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.page_allocator import PageAllocator, page_hash_chain
from engine_factories import commit_quota, make_request, make_scheduler, run_to_completion


def test_allocate_and_free_return_every_page():
    a = PageAllocator(8, 4)
    pages, hits = a.allocate(5)
    assert hits == 0 and len(set(pages)) == 5 and a.num_free_pages == 3
    assert not a.can_allocate(4)
    a.free(pages)
    assert a.num_free_pages == 8
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(pages[:1])


def test_hash_chain_keys_name_the_whole_prefix():
    x = page_hash_chain([1, 2, 3, 4, 5, 6, 7, 8], 4, 2)
    y = page_hash_chain([1, 2, 3, 4, 5, 6, 7, 9], 4, 2)
    z = page_hash_chain([0, 2, 3, 4, 5, 6, 7, 8], 4, 2)
    assert x[0] == y[0] and x[1] != y[1]
    assert z[0] != x[0] and z[1] != x[1]          # same second page, different prefix


def test_shared_pages_are_refcounted_and_become_evictable():
    a = PageAllocator(6, 4, enable_prefix_caching=True)
    keys = page_hash_chain(list(range(8)), 4, 2)
    p1, h1 = a.allocate(3, keys)
    assert h1 == 0 and a.publish(p1[:2], keys) == 2
    p2, h2 = a.allocate(3, keys)
    assert h2 == 2 and p2[:2] == p1[:2] and a.refcount(p1[0]) == 2
    a.free(p1)
    a.free(p2)
    assert a.num_free_pages == 6 and a.num_cached_pages == 2     # cached but reusable
    assert a.hit_rate == 0.5                                      # 2 hits out of 4 lookups


def test_lru_eviction_forgets_the_least_recently_released_prefix():
    a = PageAllocator(4, 4, enable_prefix_caching=True)
    old, new = page_hash_chain([1] * 4, 4, 1), page_hash_chain([2] * 4, 4, 1)
    po, _ = a.allocate(1, old)
    a.publish(po, old)
    pn, _ = a.allocate(1, new)
    a.publish(pn, new)
    a.free(po)
    a.free(pn)                                                    # LRU order: old, then new
    taken, _ = a.allocate(3)                                      # 2 free + 1 eviction
    assert po[0] in taken and a.match(old) == [] and a.match(new) == pn
    a.free(taken)
    assert a.num_free_pages == 4


def test_can_allocate_counts_idle_hits_once():
    a = PageAllocator(2, 4, enable_prefix_caching=True)
    keys = page_hash_chain([5] * 4, 4, 1)
    p, _ = a.allocate(1, keys)
    a.publish(p, keys)
    a.free(p)
    assert a.can_allocate(2, keys)           # the hit page + 1 free one
    assert not a.can_allocate(3, keys)


def test_scheduler_prefix_cache_hits_skip_the_shared_prompt():
    s = make_scheduler(num_pages=64, page_size=4, kv_cache_mode="dual", enable_prefix_caching=True)
    prompt = list(range(1, 19))                    # 18 tokens: pages of the first 16 positions frozen
    s.add(make_request("first", prompt=prompt))
    first = s.schedule()
    assert first.scheduled[0].q_start == 0
    s.update(first, commit_quota(first))           # its refresh wrote the prompt pages: published
    s.add(make_request("second", prompt=prompt[:17] + [40]))   # same first 16 tokens
    sched = s.schedule()
    item = next(i for i in sched.scheduled if i.request_id == "second")
    assert item.kind == "refresh" and item.q_start == 16
    shared = s.running["second"].page_ids[:4]
    assert shared == s.running["first"].page_ids[:4]
    assert all(s.allocator.refcount(p) == 2 for p in shared)
    s.update(sched, commit_quota(sched))
    run_to_completion(s)
    assert s.allocator.num_free_pages == 64 and s.allocator.hit_rate == 0.5
    assert s.allocator.stats()["cached_pages"] == 4


def test_later_refreshes_skip_frozen_prompt_pages():
    s = make_scheduler(num_pages=64, page_size=4, kv_cache_mode="prefix", enable_prefix_caching=True)
    s.add(make_request("a", prompt=list(range(1, 14)), max_tokens=16, block_length=8, steps=8))
    starts = []
    while s.has_unfinished():
        sched = s.schedule()
        starts += [i.q_start for i in sched.scheduled if i.kind == "refresh"]
        s.update(sched, commit_quota(sched))
    assert starts == [0, 12]                       # 13-token prompt: 3 full pages frozen


def test_prefix_caching_needs_a_kv_cache():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(kv_cache_mode="none", enable_prefix_caching=True)


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("kv_cache_mode", "paged"),
                                         ("page_size", 0), ("dtype", "fp8"), ("device", "tpu"),
                                         ("gpu_memory_utilization", 1.5)])
def test_config_errors_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}={value!r}"):
        EngineConfig(**{field: value})
