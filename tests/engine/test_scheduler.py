"""Scheduler: admission limits, FIFO, first-done-first-out, abort, early exit (no model, ms)."""
from __future__ import annotations

import pytest

from dfastllm_ray.engine.outputs import CACHED, FULL, REFRESH, RunnerOutput
from engine_factories import (EOS, MASK, TOKEN, candidates, commit_quota, committed, make_request,
                              make_scheduler,
                              run_to_completion)


def test_max_num_seqs_limits_the_running_set_and_admits_fifo():
    s = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add(make_request(rid))
    out = s.schedule()
    assert out.admitted == ["a", "b"] and [r.request_id for r in s.waiting] == ["c"]
    assert s.abort("a") is not None
    s.update(out, commit_quota(out))
    assert s.schedule().admitted == ["c"]


def test_token_budget_limits_each_step_and_rotates_fairly():
    # no cache: every step is a full canvas of 12 + 16 = 28 tokens; budget fits two
    s = make_scheduler(kv_cache_mode="none", max_num_batched_tokens=60)
    for rid in "abc":
        s.add(make_request(rid))
    first = s.schedule()
    assert [i.request_id for i in first.scheduled] == ["a", "b"]
    assert first.num_batched_tokens == 56 and all(i.kind == FULL for i in first.scheduled)
    s.update(first, commit_quota(first))
    # c is still waiting (no budget left after a and b); a and b keep running
    second = s.schedule()
    assert {i.request_id for i in second.scheduled} == {"a", "b"} and len(s.waiting) == 1


def test_strict_fifo_head_of_line_blocks_on_pages():
    s = make_scheduler(num_pages=12, page_size=4)
    s.add(make_request("a", prompt_len=12, max_tokens=16))     # 28 tokens = 7 pages
    s.add(make_request("big", prompt_len=20, max_tokens=16))   # 36 tokens = 9 pages: 5 are free
    s.add(make_request("small", prompt_len=4, max_tokens=8))   # 3 pages would fit, but waits its turn
    out = s.schedule()
    assert out.admitted == ["a"] and s.allocator.num_free_pages == 5
    assert [r.request_id for r in s.waiting] == ["big", "small"]
    finals = run_to_completion(s)
    assert set(finals) == {"a", "big", "small"} and s.allocator.num_free_pages == 12


def test_first_done_first_out_frees_pages_at_once():
    s = make_scheduler(num_pages=64)
    s.add(make_request("long", max_tokens=32, block_length=8))
    s.add(make_request("short", max_tokens=8, block_length=8))
    finished_order, steps = [], 0
    while s.has_unfinished():
        sched = s.schedule()
        steps += 1
        for o in s.update(sched, commit_quota(sched)):
            if o.finished:
                finished_order.append((o.request_id, steps))
                assert o.request_id not in s.running
    assert [r for r, _ in finished_order] == ["short", "long"]
    assert finished_order[0][1] == 8 and s.allocator.num_free_pages == 64


def test_fixed_schedule_runs_steps_per_block_and_reports_nfe():
    s = make_scheduler()
    s.add(make_request("a", max_tokens=16, block_length=8, steps=8))  # 2 blocks x 4 steps x 2 tokens
    final = run_to_completion(s)["a"]
    assert final.finish_reason == "length" and final.nfe == 8
    assert final.token_ids == [TOKEN] * 16 and s.allocator.num_free_pages == 64


def test_block_steps_refresh_then_cached_windows():
    s = make_scheduler(kv_cache_mode="prefix")
    s.add(make_request("a", prompt_len=12, max_tokens=16, block_length=8, steps=8))
    kinds = []
    while s.has_unfinished():
        sched = s.schedule()
        item = sched.scheduled[0]
        kinds.append((item.kind, item.q_start, item.q_len))
        s.update(sched, commit_quota(sched))
    assert kinds[0] == (REFRESH, 0, 28) and kinds[1] == (CACHED, 12, 16)
    assert kinds[4] == (REFRESH, 0, 28) and kinds[5] == (CACHED, 20, 8)
    s2 = make_scheduler(kv_cache_mode="dual")
    s2.add(make_request("a", prompt_len=12, max_tokens=16, block_length=8, steps=8))
    s2.update(first := s2.schedule(), commit_quota(first))
    item = s2.schedule().scheduled[0]
    assert (item.kind, item.q_start, item.q_len, item.kv_len) == (CACHED, 12, 8, 28)


@pytest.mark.parametrize("where", ["waiting", "running", "mid_step"])
def test_abort_frees_every_page(where):
    s = make_scheduler(num_pages=16, max_num_seqs=1)
    s.add(make_request("a"))
    s.add(make_request("b"))
    sched = s.schedule()
    target = "b" if where == "waiting" else "a"
    if where == "running":
        s.update(sched, commit_quota(sched))
    out = s.abort(target)
    assert out.finished and out.finish_reason == "abort"
    if where == "mid_step":
        assert s.update(sched, commit_quota(sched)) == []    # the aborted row's commits are dropped
    assert s.abort(target) is None
    run_to_completion(s)
    assert s.allocator.num_free_pages == 16 and not s.has_unfinished()


def test_eos_in_a_committed_block_exits_early_and_cuts_the_tail():
    s = make_scheduler(num_pages=16)
    req = make_request("a", prompt_len=12, max_tokens=32, block_length=8, steps=32)
    s.add(req)
    final = run_to_completion(s, eos_at={"a": {12 + 10}})   # EOS at generated index 10 (block 1)
    assert final["a"].finish_reason == "stop" and final["a"].token_ids == [TOKEN] * 10
    assert final["a"].nfe == 16 and final["a"].nfe_saved == 16
    assert s.allocator.num_free_pages == 16 and s.total_nfe_saved == 16


def test_early_exit_off_decodes_every_block_but_still_cuts_at_eos():
    s = make_scheduler(num_pages=16)
    s.add(make_request("a", prompt_len=12, max_tokens=32, block_length=8, steps=32, early_exit=False))
    final = run_to_completion(s, eos_at={"a": {12 + 3}})["a"]
    assert final.finish_reason == "stop" and final.token_ids == [TOKEN] * 3 and final.nfe == 32


def test_streaming_deltas_cover_each_committed_block_once():
    s = make_scheduler()
    s.add(make_request("a", max_tokens=24, block_length=8, steps=24))
    deltas = []
    while s.has_unfinished():
        sched = s.schedule()
        deltas += [o.delta_token_ids for o in s.update(sched, commit_quota(sched))]
    assert deltas == [[TOKEN] * 8] * 3


def test_threshold_policy_block_ends_when_no_masks_left():
    s = make_scheduler(kv_cache_mode="none")
    s.add(make_request("a", max_tokens=8, block_length=8, steps=8, threshold=0.9))
    sched = s.schedule()
    item = sched.scheduled[0]
    pos = candidates(item)
    everything = RunnerOutput({"a": committed(item, pos, [TOKEN] * len(pos))})
    (out,) = s.update(sched, everything)
    assert out.finished and out.nfe == 1 and out.token_ids == [TOKEN] * 8


def test_rejects_what_can_never_run():
    s = make_scheduler(num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="KV pages"):
        s.add(make_request("a", prompt_len=12, max_tokens=16))
    s = make_scheduler(max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        s.add(make_request("a", prompt_len=12, max_tokens=16))
    s = make_scheduler()
    s.add(make_request("a"))
    with pytest.raises(ValueError, match="already"):
        s.add(make_request("a"))


def test_prompt_masks_compete_in_full_forwards():
    s = make_scheduler(kv_cache_mode="none")
    s.add(make_request("a", prompt=[1, 2, MASK, 4], max_tokens=8, block_length=8, steps=8))
    item = s.schedule().scheduled[0]
    assert candidates(item) == [2] + list(range(4, 12)) and item.num_candidates == 9
    assert EOS not in candidates(item)
