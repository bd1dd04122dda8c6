"""The engine == the plain reference loop (sampling/policy_generate.py) for the policies it runs
end to end: PC-Sampler and SchED (and fixed / threshold as controls), token for token and
forward for forward, on the tiny reference checkpoint without a KV cache."""
from __future__ import annotations

import random

import pytest
import torch

from engine_models import engine, expected_tokens, run_all, tiny

from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.sampling.policy_generate import policy_generate

SETTINGS = {
    "fixed": {"steps": 16},
    "threshold": {"threshold": 0.05},
    "pc_sampler": {"pc_lambda": 0.25, "steps": 8},
    "pc_sampler_strong": {"pc_lambda": 2.0, "steps": 16},
    "sched_exit": {"exit_high": 0.9, "exit_low": 0.05, "steps": 16},   # exits mid-block
    "dus": {"dilated": True, "steps": 4},
    "dus_3": {"dilated": True, "steps": 6},                 # 3 groups per block of 8: 3, 3, 2
}


def prompts(n: int, length: int, spec) -> list[list[int]]:
    rng = random.Random(length)
    banned = {spec.mask_token_id, *spec.stop_token_ids}
    return [[t for t in (rng.randrange(spec.vocab_size) for _ in range(3 * length))
             if t not in banned][:length] for _ in range(n)]


def reference(name: str):
    loaded = tiny("llada-tiny")
    params = SamplingParams(max_tokens=16, block_length=8, **SETTINGS[name])
    rows = prompts(3, 10, loaded.spec)
    return loaded, params, rows, policy_generate(loaded.model, torch.tensor(rows), params,
                                                 spec=loaded.spec)


def test_settings_discriminate():
    """The cases below can fail: SchED leaves blocks early but not at once, and a strong
    position decay reorders the fixed schedule's commits."""
    fixed, pc, sched = (reference(n)[3] for n in ("fixed", "pc_sampler_strong", "sched_exit"))
    assert all(2 < n < 16 for n in sched.nfe) and fixed.nfe == pc.nfe == [16] * 3
    assert not torch.equal(fixed.x, pc.x)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_engine_equals_policy_loop(name):
    loaded, params, rows, ref = reference(name)
    finals = run_all(engine("llada-tiny", "none"),
                     {str(r): (p, params) for r, p in enumerate(rows)})
    assert params.policy == name.replace("_strong", "").replace("_3", "")
    for r in range(len(rows)):
        want = expected_tokens(ref.x[r].tolist(), 10, loaded.spec.stop_token_ids,
                               loaded.spec.mask_token_id)
        assert finals[str(r)].token_ids == want, f"row {r}"
        assert finals[str(r)].nfe == ref.nfe[r], f"row {r}"


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_modes_keep_the_schedule(mode):
    """With a KV cache the engine plans PC-Sampler and SchED like `fixed`: PC-Sampler takes
    exactly steps_per_block forwards per block, SchED at most that, and both fill every block."""
    loaded = tiny("llada-tiny")
    rows = prompts(3, 10, loaded.spec)
    for name, bound in (("pc_sampler", "exact"), ("dus", "exact"), ("sched_exit", "at_most")):
        params = SamplingParams(max_tokens=16, block_length=8, early_exit=False, **SETTINGS[name])
        finals = run_all(engine("llada-tiny", mode), {str(r): (p, params) for r, p in enumerate(rows)})
        spb = params.steps // 2
        for out in finals.values():
            assert out.num_masks_left == 0
            assert out.nfe == 2 * spb if bound == "exact" else out.nfe <= 2 * spb
        if bound == "at_most":                                   # SchED does leave early
            assert min(out.nfe for out in finals.values()) < 2 * spb
