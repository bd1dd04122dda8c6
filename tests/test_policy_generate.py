"""The reference loop of the newer policies (sampling/policy_generate.py) on the tiny reference
checkpoint: deterministic pinned outputs, B rows == each row alone, and WINO's revocations never
reach a final block."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from engine_models import tiny                                   # noqa: E402
from test_engine_new_policies import prompts                     # noqa: E402

from dfastllm_ray.sampling.params import SamplingParams          # noqa: E402
from dfastllm_ray.sampling.policy_generate import policy_generate   # noqa: E402

SETTINGS = {
    "pc_sampler": {"pc_lambda": 0.25, "steps": 8},
    "sched_exit": {"exit_high": 0.9, "exit_low": 0.05},
    "klass": {"threshold": 0.02, "kl_threshold": 0.05},
    "wino": {"threshold": 0.001, "revoke_threshold": 0.99},       # revokes often
    "credit": {"credit_alpha": 3.0, "threshold": 0.99},
}
# (NFE per row, generated ids per row) of two 10-token prompts, 16 positions in blocks of 8
PINNED = {
    "pc_sampler": ([8, 8],
        [[454, 147, 271, 172, 310, 195, 20, 53, 172, 63, 172, 137, 19, 383, 328, 332],
        [353, 172, 172, 373, 244, 373, 464, 244, 328, 317, 317, 274, 87, 91, 309, 328]]),
    "sched_exit": ([7, 5],
        [[60, 63, 36, 371, 336, 459, 502, 63, 317, 317, 63, 137, 137, 459, 172, 172],
        [353, 172, 172, 373, 164, 102, 353, 172, 172, 172, 172, 63, 369, 172, 172, 172]]),
    "klass": ([15, 14],
        [[60, 63, 89, 89, 336, 459, 127, 168, 354, 81, 336, 336, 137, 419, 473, 473],
        [353, 172, 172, 373, 244, 373, 353, 214, 214, 44, 91, 170, 157, 214, 214, 44]]),
    "wino": ([8, 8],
        [[388, 44, 271, 63, 336, 459, 459, 168, 75, 459, 328, 200, 204, 459, 459, 172],
        [353, 172, 172, 373, 244, 354, 464, 63, 328, 317, 274, 99, 172, 99, 463, 172]]),
    "credit": ([6, 9],
        [[271, 147, 271, 63, 336, 220, 60, 168, 459, 459, 459, 287, 459, 459, 459, 172],
         [353, 172, 172, 373, 244, 373, 353, 214, 214, 421, 91, 412, 99, 214, 214, 162]]),
}


def run(name: str, rows=None, trace: bool = False):
    loaded = tiny("llada-tiny")
    rows = rows if rows is not None else prompts(2, 10, loaded.spec)
    params = SamplingParams(max_tokens=16, block_length=8, **SETTINGS[name])
    assert params.policy == name
    return policy_generate(loaded.model, torch.tensor(rows), params, spec=loaded.spec, trace=trace)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_pinned_and_deterministic(name):
    a, b = run(name), run(name)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe
    nfe, gen = PINNED[name]
    assert a.nfe == nfe and a.x[:, 10:].tolist() == gen


def test_credit_fusion_changes_the_threshold_rule():
    """Same threshold without credit: more forwards (credit lifts tokens that stay on top)."""
    loaded = tiny("llada-tiny")
    plain = policy_generate(loaded.model, torch.tensor(prompts(2, 10, loaded.spec)),
                            SamplingParams(max_tokens=16, block_length=8, threshold=0.99),
                            spec=loaded.spec)
    assert all(c < p for c, p in zip(PINNED["credit"][0], plain.nfe))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_rows_batched_equal_rows_alone(name):
    rows = prompts(4, 10, tiny("llada-tiny").spec)
    together = run(name, rows)
    for r in range(len(rows)):
        alone = run(name, rows[r:r + 1])
        assert torch.equal(alone.x[0], together.x[r]) and alone.nfe[0] == together.nfe[r]


def test_wino_never_streams_a_revoked_token():
    """A block is streamed when final (`finals`, taken when it has no mask left). Every revoked
    position lies in the block being decoded, is committed again later in that block, and the
    streamed token is the last one committed there; nothing changes after a block is final."""
    res = run("wino", trace=True)
    assert sum(len(e["revoke"]) for e in res.steps) > 0                # the case can fail
    n = 8
    for (r, blk), streamed in res.finals.items():
        s = 10 + blk * n
        assert res.x[r, s:s + n].tolist() == streamed                   # final == streamed
        events = [e for e in res.steps if e["row"] == r and e["block_start"] == s]
        last: dict[int, int] = {}
        for i, e in enumerate(events):
            for p in e["revoke"]:
                assert s <= p < s + n and p in last
                assert any(p in later["commit"] for later in events[i + 1:]), (r, p)
                del last[p]
            last.update(e["commit"])
        assert [last[p] for p in range(s, s + n)] == streamed
    for e in res.steps:                                              # no revoke outside a block
        for p in e["revoke"]:
            assert e["block_start"] <= p < e["block_start"] + n
