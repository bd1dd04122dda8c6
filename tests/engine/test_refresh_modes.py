"""Refresh that neither stalls nor dominates: incremental refresh windows and chunked refreshes.

Scheduler-level tests use hand-written model outputs (milliseconds); the end-to-end ones run the
tiny LLaDA / Dream fixtures through the engine."""
from __future__ import annotations

from dataclasses import replace

import pytest

from dfastllm_ray.engine.outputs import CACHED, PREFILL, REFRESH
from dfastllm_ray.sampling.params import MAX_REFRESH_EVERY, SamplingParams
from engine_factories import commit_quota, make_request, make_scheduler
from engine_models import engine, run_all
from test_batch_invariance import mixed_requests


def _windows(s) -> list[tuple[str, int, int, int]]:
    """(kind, q_start, q_len, kv_len) of request 'a' at every step until done."""
    seen = []
    while s.has_unfinished():
        sched = s.schedule()
        seen += [(i.kind, i.q_start, i.q_len, i.kv_len) for i in sched.scheduled
                 if i.request_id == "a"]
        s.update(sched, commit_quota(sched))
    return seen


def test_incremental_refresh_recomputes_the_finished_block_and_what_follows():
    s = make_scheduler(kv_cache_mode="dual", refresh="incremental")
    s.add(make_request("a", prompt_len=12, max_tokens=24, block_length=8, steps=12))
    refreshes = [w for w in _windows(s) if w[0] == REFRESH]
    # block 0: the whole canvas; block 1: from block 0's start; block 2: from block 1's start
    assert refreshes == [(REFRESH, 0, 36, 36), (REFRESH, 12, 24, 36), (REFRESH, 20, 16, 36)]
    assert s.allocator.num_free_pages == 64


def test_full_refresh_recomputes_the_whole_canvas_every_block():
    s = make_scheduler(kv_cache_mode="dual")
    s.add(make_request("a", prompt_len=12, max_tokens=24, block_length=8, steps=12))
    assert [w for w in _windows(s) if w[0] == REFRESH] == [(REFRESH, 0, 36, 36)] * 3


def test_a_refresh_over_budget_runs_in_chunks_while_cached_requests_keep_stepping():
    s = make_scheduler(kv_cache_mode="dual", chunked_refresh=True, max_num_batched_tokens=24)
    s.add(make_request("b", prompt_len=4, max_tokens=16, block_length=8, steps=16))   # canvas 20
    s.update(first := s.schedule(), commit_quota(first))           # b's refresh: 20 tokens
    s.add(make_request("a", prompt_len=40, max_tokens=8, block_length=8, steps=8))    # canvas 48
    steps = []
    while s.has_unfinished():
        sched = s.schedule()
        steps.append({i.request_id: (i.kind, i.q_start, i.q_len, i.kv_len) for i in sched.scheduled})
        s.update(sched, commit_quota(sched))
    a = [st["a"] for st in steps if "a" in st]
    chunks = [w for w in a if w[0] == PREFILL]
    # a's first refresh (48 > the 16 tokens b's cached window leaves) is split into chunks
    # covering its prompt, each attending only to the keys written so far, then decoded
    assert chunks and chunks[0] == (PREFILL, 0, 16, 16)
    covered = [c[1] for c in chunks] + [next(w for w in a if w[0] == REFRESH)[1]]
    assert covered == sorted(covered) and covered[0] == 0
    assert all(w[1] + w[2] <= 40 for w in chunks)                   # never into the active block
    # b kept stepping in the steps that ran a's chunks
    assert any(st.get("b", ("",))[0] == CACHED and st["a"][0] == PREFILL
               for st in steps if "a" in st)
    assert s.allocator.num_free_pages == 64


@pytest.mark.parametrize("model", ["llada-tiny", "dream-tiny"])
@pytest.mark.parametrize("cfg", [dict(refresh="incremental"),
                                 dict(chunked_refresh=True, max_num_batched_tokens=64)])
def test_refresh_modes_finish_every_request_and_free_every_page(model, cfg):
    """End to end: 16 mixed requests finish, every page returns, and batch == alone holds."""
    reqs = mixed_requests([{}, {"threshold": 0.9}], n=8, seed=3)
    eng = engine(model, "dual", **cfg)
    finals = run_all(eng, reqs)
    assert set(finals) == set(reqs)
    assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages
    if "refresh" in cfg:        # no budget effects: each request alone gives the same tokens
        for rid, (prompt, params) in list(reqs.items())[:3]:
            one = run_all(engine(model, "dual", **cfg), {rid: (prompt, params)})
            assert one[rid].token_ids == finals[rid].token_ids


def test_chunked_refresh_counts_each_chunk_as_a_forward():
    eng = engine("llada-tiny", "dual", chunked_refresh=True, max_num_batched_tokens=24)
    params = SamplingParams(max_tokens=8, block_length=8, steps=8)
    finals = run_all(eng, {"a": (list(range(5, 45)), params)})        # canvas 48 > 24
    assert finals["a"].nfe > 8 and eng.stats()["num_steps"] >= finals["a"].nfe


def test_refresh_every_n_reruns_the_window_mid_block():
    """refresh_every=3: a block of 8 steps refreshes at its steps 0, 3 and 6, each over the
    window the block's first refresh covers; the others stay cached windows of the block."""
    s = make_scheduler(kv_cache_mode="dual")
    s.add(make_request("a", prompt_len=12, max_tokens=16, block_length=8, steps=16,
                       refresh_every=3))
    kinds = [w[0] for w in _windows(s)]
    block = [REFRESH, CACHED, CACHED, REFRESH, CACHED, CACHED, REFRESH, CACHED]
    assert kinds == block * 2
    assert s.allocator.num_free_pages == 64


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_refresh_every_step_equals_no_cache(mode):
    """A refresh at every step recomputes what a no-cache forward does (the whole canvas), so the
    tokens equal kv_cache_mode="none" exactly: cached == uncached where exact."""
    prompts = {f"r{i}": list(range(3 + i, 3 + i + 6 + 2 * i)) for i in range(4)}
    params = SamplingParams(max_tokens=16, block_length=8, steps=16)
    ref = run_all(engine("llada-tiny", "none"), {k: (v, params) for k, v in prompts.items()})
    every = SamplingParams(max_tokens=16, block_length=8, steps=16, refresh_every=1)
    got = run_all(engine("llada-tiny", mode), {k: (v, every) for k, v in prompts.items()})
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in ref.items()}


def test_refresh_every_mid_block_changes_the_cached_result_toward_no_cache():
    """Stale prompt keys are what a mid-block refresh removes: on some request of a batch the
    Fast-dLLM cache (first step only) differs from no cache, and refreshing each step does not."""
    prompts = {f"r{i}": list(range(3 + i, 3 + i + 6 + 2 * i)) for i in range(8)}
    params = SamplingParams(max_tokens=16, block_length=16, steps=16)
    ref = run_all(engine("llada-tiny", "none"), {k: (v, params) for k, v in prompts.items()})
    dual = run_all(engine("llada-tiny", "dual"), {k: (v, params) for k, v in prompts.items()})
    assert any(dual[k].token_ids != ref[k].token_ids for k in prompts)


def test_refresh_every_is_refused_without_a_cache():
    eng = engine("llada-tiny", "dual")
    with pytest.raises(ValueError, match="refresh_every=2 refreshes a KV cache"):
        eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=8, refresh_every=2,
                                                       kv_cache_mode="none"))
    with pytest.raises(ValueError, match=r"refresh_every=0 is invalid"):
        SamplingParams(refresh_every=0)


def test_refresh_on_content_refreshes_after_a_content_commit_only():
    """refresh_on="content": the step after one that committed a non-EOS token is a refresh over
    the prompt and the block (dual: not the all-masked blocks after it); a step after one that
    only committed EOS stays a cached window of the block."""
    s = make_scheduler(kv_cache_mode="dual")
    s.add(make_request("a", prompt_len=12, max_tokens=16, block_length=8, steps=16,
                       refresh_on="content", early_exit=False))
    # one commit per step, left to right: 12, 13 content, 14..19 EOS, then block 1 all content
    windows = []
    while s.has_unfinished():
        sched = s.schedule()
        windows += [(i.kind, i.q_start, i.q_len, i.kv_len) for i in sched.scheduled]
        s.update(sched, commit_quota(sched, eos_at={"a": set(range(14, 20))}))
    first, mid, cached = (REFRESH, 0, 28, 28), (REFRESH, 0, 20, 28), (CACHED, 12, 8, 28)
    assert windows[:8] == [first, mid, mid] + [cached] * 5
    b1_first, b1_mid = (REFRESH, 0, 28, 28), (REFRESH, 0, 28, 28)   # block 1 ends the canvas
    assert windows[8:] == [b1_first] + [b1_mid] * 7
    assert s.allocator.num_free_pages == 64


def test_refresh_budget_bounds_the_content_refreshes_of_a_request():
    """refresh_budget=1: only the first content commit's step refreshes; block 1 (all content)
    then steps as the plain dual cache (its first refresh, cached windows after)."""
    s = make_scheduler(kv_cache_mode="dual")
    s.add(make_request("a", prompt_len=12, max_tokens=16, block_length=8, steps=16,
                       refresh_on="content", refresh_budget=1, early_exit=False))
    windows = []
    while s.has_unfinished():
        sched = s.schedule()
        windows += [(i.kind, i.q_start, i.q_len) for i in sched.scheduled]
        s.update(sched, commit_quota(sched, eos_at={"a": set(range(14, 20))}))
    assert windows == ([(REFRESH, 0, 28), (REFRESH, 0, 20)] + [(CACHED, 12, 8)] * 6
                       + [(REFRESH, 0, 28)] + [(CACHED, 20, 8)] * 7)
    with pytest.raises(ValueError, match="refresh_budget"):
        SamplingParams(refresh_budget=-1)


def test_refresh_on_content_in_prefix_mode_refreshes_the_whole_window():
    s = make_scheduler(kv_cache_mode="prefix")
    s.add(make_request("a", prompt_len=12, max_tokens=16, block_length=8, steps=16,
                       refresh_on="content"))
    kinds = [w[:3] for w in _windows(s)][:3]
    assert kinds == [(REFRESH, 0, 28), (REFRESH, 0, 28), (REFRESH, 0, 28)]


@pytest.mark.parametrize("model", ["llada-tiny", "dream-tiny"])
def test_refresh_on_content_batch_equals_alone_and_frees_pages(model):
    reqs = mixed_requests([{"refresh_on": "content"}, {"refresh_on": "content", "threshold": 0.9}],
                          n=6, seed=5)
    eng = engine(model, "dual")
    finals = run_all(eng, reqs)
    assert set(finals) == set(reqs)
    assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages
    for rid, (prompt, params) in list(reqs.items())[:3]:
        one = run_all(engine(model, "dual"), {rid: (prompt, params)})
        assert one[rid].token_ids == finals[rid].token_ids


def test_refresh_on_content_is_no_cache_when_every_commit_is_content():
    """With EOS never committed (logits_eos_inf) and no budget, every step after the first
    refreshes, and the window ends at the canvas in a single-block request: the tokens equal no
    cache exactly."""
    prompts = {f"r{i}": list(range(3 + i, 3 + i + 6 + 2 * i)) for i in range(4)}
    params = SamplingParams(max_tokens=16, block_length=16, steps=16, logits_eos_inf=True)
    ref = run_all(engine("llada-tiny", "none"), {k: (v, params) for k, v in prompts.items()})
    content = SamplingParams(max_tokens=16, block_length=16, steps=16, logits_eos_inf=True,
                             refresh_on="content", refresh_budget=MAX_REFRESH_EVERY)
    got = run_all(engine("llada-tiny", "dual"), {k: (v, content) for k, v in prompts.items()})
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in ref.items()}


def test_refresh_on_is_refused_without_a_cache_and_checked():
    eng = engine("llada-tiny", "dual")
    with pytest.raises(ValueError, match="refresh_on=content refreshes a KV cache"):
        eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=8, refresh_on="content",
                                                       kv_cache_mode="none"))
    with pytest.raises(ValueError, match="refresh_on"):
        SamplingParams(refresh_on="always")
    # the engine's measured default budget applies unless the request sets one (0 included)
    on = SamplingParams(max_tokens=8, block_length=8, refresh_on="content")
    assert eng.resolve_params(on, 3).refresh_budget == 2
    assert eng.resolve_params(replace(on, refresh_budget=0), 3).refresh_budget == 0
