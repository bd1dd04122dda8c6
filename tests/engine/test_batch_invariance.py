"""Batch invariance: 16 requests of different lengths and settings, submitted together or one
per step, produce exactly what each produces alone; EOS exit and abort free every page."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.sampling.params import SamplingParams
from engine_models import engine, run_all, tiny

LLADA_KNOBS = [{}, {"threshold": 0.5}, {"factor": 1.0}, {"entropy_bound": 2.0},
               {"remasking": "random", "seed": 7}, {"temperature": 0.8, "seed": 11},
               {"threshold": 0.3, "temperature": 0.5, "seed": 3}]
DREAM_KNOBS = [{"alg": "entropy"}, {"alg": "maskgit_plus"}, {"alg": "topk_margin", "top_p": 0.9},
               {"alg": "origin", "seed": 5}, {"alg": "maskgit_plus", "alg_temp": 0.5, "seed": 9},
               {"alg": "entropy", "temperature": 0.4, "seed": 2}, {"alg": "maskgit_plus", "threshold": 0.5}]


def mixed_requests(knobs: list[dict], n: int = 16, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        gen = rng.choice([8, 16, 24, 32])
        block = rng.choice([b for b in (4, 8, 16, 32) if gen % b == 0])
        steps = (gen // block) * rng.choice([1, block // 2 or 1, block])
        params = SamplingParams(max_tokens=gen, block_length=block, steps=steps, **knobs[i % len(knobs)])
        prompt = [rng.randrange(0, 496) for _ in range(rng.randrange(1, 30))]
        out[f"r{i}"] = (prompt, params)
    return out


def alone(model: str, mode: str, requests: dict) -> dict:
    return {rid: run_all(engine(model, mode), {rid: req})[rid] for rid, req in requests.items()}


def summary(finals: dict) -> dict:
    return {rid: (o.token_ids, o.nfe, o.finish_reason) for rid, o in finals.items()}


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
@pytest.mark.parametrize("model,knobs", [("llada-tiny", LLADA_KNOBS), ("dream-tiny", DREAM_KNOBS)],
                         ids=["llada", "dream"])
def test_batch_equals_alone(model, knobs, mode):
    if model == "dream-tiny" and mode == "none":     # Dream's uncached threshold needs steps | max_tokens
        knobs = knobs[:-1]
    requests = mixed_requests(knobs)
    single = summary(alone(model, mode, requests))
    eng = engine(model, mode, max_num_seqs=16)
    assert summary(run_all(eng, requests)) == single
    assert summary(run_all(engine(model, mode), requests, stagger=1)) == single
    assert summary(run_all(engine(model, mode, max_num_seqs=5), requests)) == single
    if eng.pool is not None:
        assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages


def test_token_budget_splits_steps_without_changing_tokens():
    requests = mixed_requests(LLADA_KNOBS, n=8, seed=1)
    single = summary(alone("llada-tiny", "dual", requests))
    eng = engine("llada-tiny", "dual", max_num_batched_tokens=64)
    assert summary(run_all(eng, requests)) == single


@pytest.mark.parametrize("mode", ["none", "dual"])
def test_eos_exit_cuts_the_tail_saves_forwards_and_frees_pages(mode):
    requests = mixed_requests([{}], n=6, seed=3)
    requests["r0"] = (list(range(20, 31)), SamplingParams(max_tokens=32, block_length=8, steps=32))
    full = summary(alone("llada-tiny", mode, requests))
    stop = full["r0"][0][9]              # pretend r0's 10th token (block 1 of 4) is end-of-turn
    loaded = tiny("llada-tiny")
    eng = Engine(replace(loaded, spec=replace(loaded.spec, eot_token_id=stop)),
                 EngineConfig(kv_cache_mode=mode, page_size=4, num_pages=512))
    finals = run_all(eng, requests)
    for rid, out in finals.items():
        ids, nfe, _ = full[rid]
        if stop in ids:
            assert out.finish_reason == "stop" and out.token_ids == ids[:ids.index(stop)]
            assert out.nfe <= nfe
        else:
            assert (out.token_ids, out.nfe, out.finish_reason) == full[rid]
    assert finals["r0"].nfe_saved > 0 and eng.scheduler.total_nfe_saved > 0
    if eng.pool is not None:
        assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages


def test_abort_mid_generation_frees_every_page():
    eng = engine("llada-tiny", "dual", max_num_seqs=4)
    for i in range(6):                        # r4, r5 wait in the queue: aborted from there
        eng.add_request(f"r{i}", list(range(1, 3 + 5 * i)), SamplingParams(max_tokens=16, steps=16))
    eng.step()
    eng.step()
    aborted = [eng.abort(rid) for rid in ("r0", "r3", "r5")]
    assert all(o.finished and o.finish_reason == "abort" for o in aborted)
    while eng.has_unfinished():
        eng.step()
    assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages


def test_prefix_cache_shares_prompt_pages_across_requests():
    eng = engine("llada-tiny", "dual", enable_prefix_caching=True)
    system = list(range(100, 140))                       # 40 shared tokens = 10 pages of 4
    params = SamplingParams(max_tokens=16, block_length=8, steps=16)
    run_all(eng, {"a": (system + [1, 2, 3], params)})
    finals = run_all(eng, {"b": (system + [4, 5], params), "c": (system + [6], params)})
    assert finals["b"].num_cached_tokens == 40 and finals["c"].num_cached_tokens == 40
    stats = eng.stats()
    assert stats["prefix_hit_rate"] > 0.6 and stats["free_pages"] == eng.pool.num_pages
