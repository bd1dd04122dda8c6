"""The `speed` dial as data: which policy and settings `exact` / `balanced` / `fast` mean, per
model family, with the measurement each pick stands on. The engine applies it
(`Engine._apply_speed`): to a request's `speed`, and to a request with no decoding knob at all
(`EngineConfig.default_speed`, "balanced"); the HTTP body takes `speed` as well.

The rule (issue 12): `exact` is the reference schedule (one token per step) with no approximate
KV cache; `balanced` the measured setting at 4 <= TPF < 8 within 1 point of `exact`; `fast` the
one at TPF >= 8 within 2 points. Among the settings that meet a rule on every measured
checkpoint, schedule-fixed TPF first, then the best worst-case margin, then the best mean margin
(`benchmarks/policy_frontier.py`, `dial`). Every point is measured without a KV cache, greedy,
16 positions in one block: LLaDA's with the reference loop of its policy on the shipped tiny
LLaDA and two earlier checkpoints, Dream's through the engine on the shipped twin; the numbers are in the family's `MEASURED_BY` JSON and
`tests/test_speed_dial.py` checks they agree with it. `tokens_per_step` sets
`steps = max_tokens // tokens_per_step`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPEEDS = ("exact", "balanced", "fast")
MEASURED_BY = {"llada": "benchmarks/results/policy_frontier.json",      # family -> its JSON
               "dream": "benchmarks/results/policy_frontier_dream.json"}


@dataclass(frozen=True)
class SpeedPoint:
    setting: str                       # the setting's name in its family's MEASURED_BY JSON
    knobs: dict = field(default_factory=dict)   # SamplingParams fields
    tokens_per_step: int = 1           # steps = max_tokens // tokens_per_step
    kv_cache_mode: str = "none"        # the cache mode the point was measured with
    accuracy: float = 0.0              # measured held-out accuracy (mean over tasks)
    tpf: float = 1.0                   # measured tokens per forward


SPEED_DIAL: dict[str, dict[str, SpeedPoint | None]] = {
    # tiny-llada stage 6, 400 held-out prompts, 16 positions in one block; the picks also meet
    # their rule on stages 5 and 4 (worst margins -0.2 / +0.5 points): docs/policies.md
    "llada": {
        "exact": SpeedPoint('reference', {}, 1,
                       accuracy=0.7600, tpf=1.000),
        "balanced": SpeedPoint('dus 4/step', {'dilated': True}, 4,
                       accuracy=0.7575, tpf=4.000),
        "fast": SpeedPoint('dus 8/step', {'dilated': True}, 8,
                       accuracy=0.7650, tpf=8.000),
    },
    # tiny-dream stage 2 through the engine without a cache (its alg: entropy), same protocol;
    # one checkpoint only, Dream's own schedule (PC-Sampler / DUS are LLaDA-family knobs)
    "dream": {
        "exact": SpeedPoint('reference', {}, 1,
                       accuracy=0.7525, tpf=1.000),
        "balanced": SpeedPoint('fixed 4/step', {}, 4,
                       accuracy=0.7500, tpf=4.000),
        "fast": SpeedPoint('fixed 8/step', {}, 8,
                       accuracy=0.7500, tpf=8.000),
    },
}


def speed_knobs(family: str, speed: str, max_tokens: int) -> tuple[dict, str]:
    """-> (SamplingParams fields, kv_cache_mode) of `speed` for `family` at `max_tokens`."""
    if speed not in SPEEDS:
        raise ValueError(f"speed={speed!r} is invalid: must be one of {SPEEDS}")
    points = SPEED_DIAL.get(family)
    if points is None:
        raise ValueError(f"speed={speed!r} is not measured for the {family!r} family: set the "
                         f"decoding knobs by hand (measured families: {sorted(SPEED_DIAL)})")
    point = points[speed]
    if point is None:
        raise ValueError(f"speed={speed!r}: no measured setting of the {family!r} family meets "
                         "its rule; use 'balanced' or set the knobs by hand")
    steps = max(max_tokens // point.tokens_per_step, 1)
    return {**point.knobs, "steps": steps}, point.kv_cache_mode
