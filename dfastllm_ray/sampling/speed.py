"""The `speed` dial as data: which policy and settings `exact` / `balanced` / `fast` mean, per
model family, with the measurement each pick stands on. Not wired into the engine or the HTTP
layer here (the lead does that); `speed_knobs` is what they call.

The rule (issue 12): `exact` is the reference schedule (one token per step) with no approximate
KV cache; `balanced` the measured setting at TPF >= 4 within 1 point of `exact`; `fast` the one at
TPF >= 8 within 2 points. Among the settings that meet a rule the most accurate is picked
(`benchmarks/policy_frontier.py`, `dial`). Every point here is measured with the reference loop
of its policy (no KV cache) on the shipped tiny LLaDA, 16 positions in one block, greedy; the
numbers are in `MEASURED_BY`'s JSON and `tests/test_speed_dial.py` checks they agree with it.
`tokens_per_step` sets `steps = max_tokens // tokens_per_step` (the fixed schedule's quota); the
threshold-style policies loop until the block is done and take it only as their fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPEEDS = ("exact", "balanced", "fast")
MEASURED_BY = "benchmarks/results/policy_frontier.json"


@dataclass(frozen=True)
class SpeedPoint:
    setting: str                       # the setting's name in MEASURED_BY
    knobs: dict = field(default_factory=dict)   # SamplingParams fields
    tokens_per_step: int = 1           # steps = max_tokens // tokens_per_step
    kv_cache_mode: str = "none"        # the cache mode the point was measured with
    accuracy: float = 0.0              # measured held-out accuracy (mean over tasks)
    tpf: float = 1.0                   # measured tokens per forward


SPEED_DIAL: dict[str, dict[str, SpeedPoint | None]] = {
    "llada": {
        "exact": SpeedPoint('reference', {}, 1,
                       accuracy=0.4150, tpf=1.000),
        "balanced": SpeedPoint('pc_sampler l=0.25 4/step', {'pc_lambda': 0.25}, 4,
                       accuracy=0.4275, tpf=4.000),
        "fast": SpeedPoint('pc_sampler l=0.25 8/step', {'pc_lambda': 0.25}, 8,
                       accuracy=0.4225, tpf=8.000),
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
