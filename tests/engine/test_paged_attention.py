"""Paged attention without the gather (engine/paged_attention.py) == SDPA over gathered pages.

CPU: FlexAttention runs eagerly (it evaluates mask_mod over every query x pool slot, and ignores
the block lists), so the block lists the compiled kernel trusts are checked separately against
mask_mod. GPU (`-m gpu`): the compiled kernel against SDPA + gather in bfloat16.
"""
from __future__ import annotations

import random

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.kv_pool import KVPool
from dfastllm_ray.engine.paged_attention import (PageMap, PagedAttention, build_paged_attention,
                                                 paged_block_mask, pool_keys)
from dfastllm_ray.engine.paged_kv import build_paged_kv
from dfastllm_ray.models.layers import attention
from dfastllm_ray.sampling.params import SamplingParams
from engine_models import engine, run_all, tiny

# Eager flex warns once that it is unfused; that is the point of the CPU path.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def paged_case(ps=4, num_pages=40, heads=4, kv_heads=2, d=16, dtype=torch.float32,
               device="cpu", seed=0):
    """Three rows with ragged canvases, pages out of order, two pages shared by rows 0 and 1
    (prefix caching), windows inside the canvas (dual) and running to its end (prefix)."""
    g = torch.Generator().manual_seed(seed)
    pool = KVPool(2, num_pages, ps, kv_heads, d, dtype, device)
    pool.data.copy_(torch.randn(pool.data.shape, generator=g).to(dtype))
    tables = [[3, 7, 1, 9, 12], [3, 7, 20, 21], [30, 31, 32, 33, 34, 35]]
    page_map = PageMap(num_pages, ps, device)
    page_rows = torch.zeros(3, 8, dtype=torch.long)
    for i, t in enumerate(tables):
        page_map.admit(t)
        page_rows[i, :len(t)] = torch.tensor(t)
    kv_len = torch.tensor([18, 13, 23])          # partial last pages: 2, 1, 3 positions
    q_start, q_len = torch.tensor([8, 9, 16]), torch.tensor([4, 4, 7])
    lq, lk = 7, 23
    q = torch.randn(3, heads, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(3, kv_heads, lq, d, generator=g).to(dtype) for _ in range(2))
    to = lambda *xs: [x.to(device) for x in xs]                         # noqa: E731
    page_rows, kv_len, q_start, q_len, q, k, v = to(page_rows, kv_len, q_start, q_len, q, k, v)
    return pool, page_map, page_rows, kv_len, q_start, q_len, lq, lk, q, k, v


def gathered(pool, page_rows, kv_len, q_start, q_len, lq, lk, q, k, v, layer=0):
    """The reference path: PagedKV writes and gathers, SDPA with the runner's key mask."""
    ck, cv = build_paged_kv(pool, page_rows, q_start, q_len, lq, lk, False)(layer, k, v)
    mask = (torch.arange(lk, device=q.device) < kv_len[:, None])[:, None, None, :]
    return attention(q, ck, cv, mask), mask


def test_attend_reads_the_pages_in_place_as_sdpa_reads_the_gather():
    pool, page_map, rows, kv_len, q_start, q_len, lq, lk, q, k, v = paged_case()
    before = pool.data.clone()
    ref, mask = gathered(pool, rows, kv_len, q_start, q_len, lq, lk, q, k, v, layer=1)
    ref_pool = pool.data.clone()
    pool.data.copy_(before)
    hook = build_paged_attention(pool, page_map, rows, q_start, q_len, kv_len, lq, lk, False)
    out = hook.attend(1, q, k, v, mask)
    assert torch.equal(pool.data, ref_pool)                 # same slots written, dump included
    assert out.shape == (3, 4, lq, 16)
    for b in range(3):                                      # rows past q_len are padding
        n = int(q_len[b])
        torch.testing.assert_close(out[b, :, :n], ref[b, :, :n], rtol=1e-5, atol=1e-5)


def test_block_lists_hold_exactly_the_slots_mask_mod_allows():
    """What the compiled kernel computes: full pages without mask_mod, the partial page with
    it, nothing else. It must equal mask_mod everywhere, which must equal the row's canvas."""
    pool, page_map, rows, kv_len, *_ = paged_case()
    ps, n = pool.page_size, pool.dump_slot
    bm = paged_block_mask(page_map, rows, kv_len, ps, 7, 23)
    slot = torch.arange(n)
    for b in range(3):
        allowed = bm.mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(0), slot)
        canvas = torch.zeros(n, dtype=torch.bool)
        pos = torch.arange(int(kv_len[b]))
        canvas[rows[b, pos // ps] * ps + pos % ps] = True
        assert torch.equal(allowed, canvas)
        kernel = torch.zeros(n, dtype=torch.bool)
        for i in range(int(bm.full_kv_num_blocks[b, 0, 0])):
            kernel[int(bm.full_kv_indices[b, 0, 0, i]) * ps + torch.arange(ps)] = True
        for i in range(int(bm.kv_num_blocks[b, 0, 0])):
            page = slot[int(bm.kv_indices[b, 0, 0, i]) * ps:][:ps]
            kernel[page] |= allowed[page]
        assert torch.equal(kernel, canvas)


def logged_engine(model: str, mode: str, **cfg):
    """An engine whose model forward records (kv hook, logits) per call."""
    eng = engine(model, mode, **cfg)
    inner, log = eng.runner.model, []

    def forward(*args, **kw):
        out = inner(*args, **kw)
        log.append((kw.get("kv"), out.clone()))
        return out
    eng.runner.model = forward
    return eng, log


def ragged_requests(n: int, seed: int, **knobs) -> dict:
    """Prompts of different lengths (ragged kv_len in every group), blocks of 4 or 8."""
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        block = rng.choice([4, 8])
        params = SamplingParams(max_tokens=8, block_length=block, steps=8 // block * 2, **knobs)
        out[f"r{i}"] = ([rng.randrange(0, 496) for _ in range(rng.randrange(1, 14))], params)
    return out


def assert_flex_equals_sdpa(model: str, mode: str, requests: dict, **cfg) -> None:
    """Same tokens, NFE and forward sequence; every forward's logits within float32 tolerance."""
    ref_eng, ref_log = logged_engine(model, mode, **cfg)
    flex_eng, flex_log = logged_engine(model, mode, attention_backend="flex", **cfg)
    ref, out = run_all(ref_eng, requests), run_all(flex_eng, requests)
    assert {r: o.token_ids for r, o in out.items()} == {r: o.token_ids for r, o in ref.items()}
    assert {r: o.nfe for r, o in out.items()} == {r: o.nfe for r, o in ref.items()}
    assert len(flex_log) == len(ref_log)
    for (kv, logits), (_, ref_logits) in zip(flex_log, ref_log):
        assert kv is None or isinstance(kv, PagedAttention)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    in_place = [kv for kv, _ in flex_log if kv is not None and not kv.passthrough]
    assert in_place                                       # the cached steps read pages in place
    assert flex_eng.scheduler.allocator.num_free_pages == flex_eng.pool.num_pages


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("model,knobs", [("llada-tiny", {}), ("dream-tiny", {"alg": "entropy"})],
                         ids=["llada", "dream"])
def test_engine_flex_equals_sdpa_gather(model, knobs, mode):
    assert_flex_equals_sdpa(model, mode, ragged_requests(3, seed=len(mode), **knobs))


@pytest.mark.parametrize("cfg", [dict(refresh="incremental"),
                                 dict(chunked_refresh=True, max_num_batched_tokens=24)],
                         ids=["incremental", "chunked"])
def test_engine_flex_equals_sdpa_gather_in_partial_refreshes(cfg):
    """Refresh windows that start past 0 (and prefill chunks) attend to pages written before."""
    requests = ragged_requests(2, seed=5)
    requests["long"] = (list(range(5, 35)), SamplingParams(max_tokens=8, block_length=4, steps=4))
    assert_flex_equals_sdpa("llada-tiny", "dual", requests, **cfg)


def test_block_mask_is_built_once_per_group_with_no_sync(monkeypatch):
    """One build per forward group per step, shared by every layer: a fixed, small number of
    device ops whatever the batch size, none of them data-dependent (syncing)."""
    from dfastllm_ray.engine import step_inputs
    from dfastllm_ray.engine.op_count import count_ops
    builds, orig = [], step_inputs.build_paged_attention

    def counted(*a, **k):
        with count_ops() as c:
            out = orig(*a, **k)
        builds.append((c.kernels, dict(c.syncs)))
        return out
    monkeypatch.setattr(step_inputs, "build_paged_attention", counted)
    per_batch = {}
    for batch in (1, 8):
        eng, log = logged_engine("llada-tiny", "dual", attention_backend="flex")
        params = SamplingParams(max_tokens=8, block_length=8, steps=2)
        for i in range(batch):
            eng.add_request(str(i), list(range(3, 5 + i)), params)
        builds.clear()
        for _ in range(2):
            eng.step()
        assert len(builds) == sum(kv is not None for kv, _ in log)      # not once per layer
        assert all(syncs == {} for _, syncs in builds)
        per_batch[batch] = {n for n, _ in builds}
    # (a passthrough refresh builds no block mask: fewer ops)
    assert max(per_batch[1]) == max(per_batch[8]) <= 20, per_batch


def test_dream_fixture_exercises_gqa():
    spec = tiny("dream-tiny").spec
    assert spec.num_kv_heads < spec.num_heads


def test_flex_sees_pages_shared_by_prefix_caching():
    """Two requests with one prompt: the second reuses the first's full prompt pages, which
    then belong to two page tables at once."""
    prompt = list(range(3, 15))
    params = SamplingParams(max_tokens=8, block_length=8, steps=4)
    requests = {"a": (prompt, params), "b": (prompt + [20], params)}
    ref = run_all(engine("llada-tiny", "dual", enable_prefix_caching=True), requests, stagger=1)
    eng = engine("llada-tiny", "dual", enable_prefix_caching=True, attention_backend="flex")
    out = run_all(eng, requests, stagger=1)
    assert eng.stats()["prefix_hit_rate"] > 0
    assert {r: o.token_ids for r, o in out.items()} == {r: o.token_ids for r, o in ref.items()}


@pytest.mark.parametrize("cfg,fix", [({"attention_backend": "paged"}, "use one of"),
                                     ({"attention_backend": "flex", "kv_cache_mode": "none"},
                                      "kv_cache_mode")])
def test_attention_backend_is_validated(cfg, fix):
    with pytest.raises(ValueError, match=f"attention_backend=.*{fix}"):
        EngineConfig(**cfg)


@pytest.mark.parametrize("ps", [4, 24])
def test_flex_on_cuda_refuses_a_page_that_is_not_a_kernel_tile(ps):
    """Checked when the engine builds its PageMap, before anything is allocated."""
    with pytest.raises(ValueError, match=f"page_size={ps} .*power of two >= 16"):
        PageMap(8, ps, "cuda")


@pytest.mark.slow
def test_compiled_cpu_kernel_over_the_block_lists_equals_sdpa_gather():
    """Inductor's CPU flex kernel, like the CUDA one, visits only the listed pages (it needs the
    lists padded to every page: a CPU-only lowering check). About a minute to compile."""
    pool, page_map, rows, kv_len, q_start, q_len, lq, lk, q, k, v = paged_case(ps=16)
    kv_len, lk = kv_len * 4, 92                                # same pages, 16 positions each
    before = pool.data.clone()
    ref, mask = gathered(pool, rows, kv_len, q_start, q_len, lq, lk, q, k, v)
    pool.data.copy_(before)
    hook = build_paged_attention(pool, page_map, rows, q_start, q_len, kv_len, lq, lk, False)
    bm, n_pages = hook.block_mask, pool.num_pages
    pad = lambda x: torch.nn.functional.pad(x, (0, n_pages - x.shape[-1]))   # noqa: E731
    hook.block_mask = BlockMask.from_kv_blocks(
        bm.kv_num_blocks, pad(bm.kv_indices), bm.full_kv_num_blocks, pad(bm.full_kv_indices),
        BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)
    pool.write(0, hook.write_slots, *(x.transpose(1, 2).reshape(-1, 2, 16) for x in (k, v)))
    ck, cv = pool_keys(pool, 0)
    out = torch.compile(flex_attention, fullgraph=True)(q, ck, cv, block_mask=hook.block_mask,
                                                        enable_gqa=True)
    for b in range(3):
        n = int(q_len[b])
        torch.testing.assert_close(out[b, :, :n], ref[b, :, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ps", [16, 32])
def test_compiled_flex_equals_sdpa_gather_in_bf16(ps):
    """The compiled kernel visits only the listed pages; bf16 tolerance."""
    case = paged_case(ps=ps, num_pages=64, heads=8, kv_heads=2, d=64, dtype=torch.bfloat16,
                      device="cuda")
    pool, page_map, rows, kv_len, q_start, q_len, lq, lk, q, k, v = case
    kv_len, lk = kv_len * ps // 4, 23 * ps // 4                # same pages, more positions each
    before = pool.data.clone()
    ref, mask = gathered(pool, rows, kv_len, q_start, q_len, lq, lk, q, k, v)
    pool.data.copy_(before)
    hook = build_paged_attention(pool, page_map, rows, q_start, q_len, kv_len, lq, lk, False)
    out = hook.attend(0, q, k, v, mask)
    for b in range(3):
        n = int(q_len[b])
        torch.testing.assert_close(out[b, :, :n].float(), ref[b, :, :n].float(),
                                   rtol=2e-2, atol=2e-2)
