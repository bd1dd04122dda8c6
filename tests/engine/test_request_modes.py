"""Per-request cache mode and the `speed` dial in the engine: a request's own `kv_cache_mode`
(or its speed's) overrides the engine's default, in the same steps as other requests."""
from __future__ import annotations

import random

import pytest

from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.sampling.speed import SPEED_DIAL
from engine_models import NUM_PAGES, engine, run_all, tiny

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine


def _reqs(params: SamplingParams, n: int = 6, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {f"r{i}": ([rng.randrange(1, 490) for _ in range(rng.randint(3, 12))], params)
            for i in range(n)}


@pytest.mark.parametrize("mode", ["none", "prefix"])
def test_a_request_cache_mode_equals_an_engine_of_that_mode(mode):
    base = SamplingParams(max_tokens=16, block_length=8, steps=16)
    own = _reqs(SamplingParams(max_tokens=16, block_length=8, steps=16, kv_cache_mode=mode))
    mixed = {**own, "dual0": ([5, 6, 7, 8], base)}
    got = run_all(engine("llada-tiny", "dual"), mixed)
    want = run_all(engine("llada-tiny", mode), _reqs(base))
    for rid in own:
        assert got[rid].token_ids == want[rid].token_ids and got[rid].nfe == want[rid].nfe
    assert got["dual0"].token_ids == run_all(engine("llada-tiny", "dual"),
                                             {"dual0": mixed["dual0"]})["dual0"].token_ids


def test_speed_maps_to_the_measured_point_and_hand_knobs_win():
    eng = engine("llada-tiny", "dual")
    exact = eng.resolve_params(SamplingParams(max_tokens=16, speed="exact"), 4)
    point = SPEED_DIAL["llada"]["exact"]
    assert exact.kv_cache_mode == point.kv_cache_mode and exact.steps == 16
    fast = eng.resolve_params(SamplingParams(max_tokens=16, speed="fast"), 4)
    for k, v in SPEED_DIAL["llada"]["fast"].knobs.items():
        assert getattr(fast, k) == v
    mine = eng.resolve_params(SamplingParams(max_tokens=16, speed="fast", threshold=0.95), 4)
    assert mine.threshold == 0.95


def test_speed_exact_equals_the_reference_schedule_without_cache():
    reqs = _reqs(SamplingParams(max_tokens=16, block_length=8, speed="exact"), seed=3)
    ref = _reqs(SamplingParams(max_tokens=16, block_length=8, steps=16), seed=3)
    got = run_all(engine("llada-tiny", "dual"), reqs)
    want = run_all(engine("llada-tiny", "none"), ref)
    assert {r: o.token_ids for r, o in got.items()} == {r: o.token_ids for r, o in want.items()}


def test_bad_request_modes_name_the_field():
    with pytest.raises(ValueError, match="kv_cache_mode"):
        SamplingParams(kv_cache_mode="fast")
    with pytest.raises(ValueError, match="speed"):
        SamplingParams(speed="ludicrous")
    with pytest.raises(ValueError, match="kv_cache_mode='dual' needs a KV cache"):
        engine("llada-tiny", "none").add_request("x", [1, 2], SamplingParams(kv_cache_mode="dual"))


def test_a_request_with_no_decoding_knob_gets_the_default_speed():
    eng = engine("llada-tiny", "dual", default_speed="balanced")
    plain = eng.resolve_params(SamplingParams(max_tokens=16), 4)
    assert plain.speed == "balanced"
    for k, v in SPEED_DIAL["llada"]["balanced"].knobs.items():
        assert getattr(plain, k) == v
    chosen = eng.resolve_params(SamplingParams(max_tokens=16, steps=16), 4)
    assert chosen.speed is None and chosen.threshold is None          # the reference schedule
    off = engine("llada-tiny", "dual", default_speed=None)      # the reference schedule
    assert off.resolve_params(SamplingParams(max_tokens=16), 4).steps == 16


def test_the_engine_default_is_balanced_where_the_dial_is_measured():
    """EngineConfig() gives a request with no knob its family's `balanced` point (its steps from
    max_tokens, its cache mode), LLaDA's and Dream's alike; a knob set by hand wins."""
    assert EngineConfig().default_speed == "balanced"
    point = SPEED_DIAL["llada"]["balanced"]
    eng = Engine(tiny("llada-tiny"), EngineConfig(kv_cache_mode="dual", page_size=4,
                                                   num_pages=NUM_PAGES))
    p = eng.resolve_params(SamplingParams(max_tokens=16, block_length=16), 4)
    assert p.speed == "balanced" and p.steps == 16 // point.tokens_per_step
    assert p.kv_cache_mode == point.kv_cache_mode
    dream = Engine(tiny("dream-tiny"), EngineConfig(kv_cache_mode="dual", page_size=4,
                                                     num_pages=NUM_PAGES))
    d = dream.resolve_params(SamplingParams(max_tokens=16), 4)
    assert d.speed == "balanced" and d.steps == 16 // SPEED_DIAL["dream"]["balanced"].tokens_per_step
    assert dream.resolve_params(SamplingParams(max_tokens=16, steps=16), 4).steps == 16


@pytest.mark.parametrize("knob", [{"pc_lambda": 0.25}, {"dilated": True}, {"exit_high": 0.9},
                                  {"remasking": "random"}])
def test_llada_knobs_are_refused_on_a_dream_model(knob):
    """The offline API refuses what the HTTP layer refuses: a LLaDA-only knob on Dream (once it
    ran as a different schedule: DUS at one step per block decoded nothing with the dual cache)."""
    eng = engine("dream-tiny", "dual")
    name = next(iter(knob))
    with pytest.raises(ValueError, match=f"^{name}=.* is a LLaDA-family knob"):
        eng.add_request("x", [5, 6, 7], SamplingParams(max_tokens=8, **knob))
    assert not eng.has_unfinished()
