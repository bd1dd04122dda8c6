"""WINO (revocable) and KLASS (stateful) in the engine: each equals the plain reference loop of the same policy
(`sampling.policy_generate`) without a KV cache, batch == alone with a cache, every page freed,
and a revoked token is never streamed (outputs carry only blocks with no mask left)."""
from __future__ import annotations

import random

import pytest
import torch

from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.sampling.policy_generate import policy_generate
from engine_models import engine, run_all, tiny

SETTINGS = [dict(revoke_threshold=0.9), dict(revoke_threshold=0.8, threshold=0.5)]


def _prompts(n: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(1, 490) for _ in range(rng.randint(3, 14))] for i in range(n)}


def assert_engine_equals_policy_generate(params: SamplingParams, prompts: dict) -> None:
    """The engine without a cache == the policy's reference loop, tokens and NFE, per row."""
    loaded = tiny("llada-tiny")
    finals = run_all(engine("llada-tiny", "none"), {r: (p, params) for r, p in prompts.items()})
    stops = loaded.spec.stop_token_ids
    for rid, prompt in prompts.items():
        run = policy_generate(loaded.model, torch.tensor([prompt]), params, spec=loaded.spec)
        gen = run.x[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(gen) if t in stops), len(gen))
        assert finals[rid].token_ids == [t for t in gen[:cut] if t != loaded.spec.mask_token_id]
        assert finals[rid].nfe == run.nfe[0], rid


@pytest.mark.parametrize("knobs", SETTINGS)
def test_engine_wino_equals_the_reference_loop_without_cache(knobs):
    assert_engine_equals_policy_generate(SamplingParams(max_tokens=16, block_length=8, **knobs),
                                         _prompts(6))


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_engine_wino_with_a_cache_batch_equals_alone(mode):
    params = SamplingParams(max_tokens=16, block_length=8, revoke_threshold=0.9)
    reqs = {r: (p, params) for r, p in _prompts(8, 1).items()}
    reqs["plain"] = ([5, 6, 7, 8], SamplingParams(max_tokens=16, block_length=8, threshold=0.9))
    eng = engine("llada-tiny", mode)
    together = run_all(eng, reqs)
    for rid, req in reqs.items():
        assert run_all(engine("llada-tiny", mode), {rid: req})[rid].token_ids == \
            together[rid].token_ids, rid
    assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages


def test_a_revoked_token_is_never_streamed(monkeypatch):
    """Every streamed delta is a prefix-extension of the final output: what was sent is final,
    in runs where tokens were revoked."""
    from dfastllm_ray.engine import revocable
    revoked = []

    def counting(*a, **k):
        commit, revoke = orig(*a, **k)
        revoked.append(int(revoke.sum()))
        return commit, revoke
    orig = revocable.wino
    monkeypatch.setattr(revocable, "wino", counting)
    params = SamplingParams(max_tokens=24, block_length=8, revoke_threshold=0.95, threshold=0.3,
                            early_exit=False)
    eng = engine("llada-tiny", "none")
    for rid, p in _prompts(6, 2).items():
        eng.add_request(rid, p, params)
    sent: dict[str, list[int]] = {}
    finals = {}
    while eng.has_unfinished():
        for out in eng.step():
            sent.setdefault(out.request_id, []).extend(out.delta_token_ids)
            assert out.num_masks_left == 0
            if out.finished:
                finals[out.request_id] = out
    for rid, out in finals.items():
        assert sent[rid] == out.token_ids, rid
    assert sum(revoked) > 0, "no token was revoked: the test would prove nothing"


@pytest.mark.parametrize("knobs", [dict(kl_threshold=0.015), dict(kl_threshold=0.05, threshold=0.4)])
def test_engine_klass_equals_the_reference_loop_without_cache(knobs):
    """KLASS keeps per-position state (top-8 probabilities, a streak) across steps, on the
    device by slot: the engine equals policy_generate token for token and in NFE."""
    assert_engine_equals_policy_generate(SamplingParams(max_tokens=16, block_length=8, **knobs),
                                         _prompts(6, 4))


def test_engine_klass_with_a_cache_batch_equals_alone():
    params = SamplingParams(max_tokens=16, block_length=8, kl_threshold=0.05)
    reqs = {r: (p, params) for r, p in _prompts(8, 5).items()}
    together = run_all(engine("llada-tiny", "dual"), reqs)
    for rid, req in list(reqs.items())[:4]:
        assert run_all(engine("llada-tiny", "dual"), {rid: req})[rid].token_ids == \
            together[rid].token_ids, rid
