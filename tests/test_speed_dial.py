"""The speed dial's data (sampling/speed.py) agrees with the measurement it cites and meets its
rule; every point builds valid SamplingParams; bad input names the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.sampling.speed import MEASURED_BY, SPEED_DIAL, SPEEDS, speed_knobs

ROOT = Path(__file__).resolve().parents[1]
RULES = {"balanced": (4.0, 0.01), "fast": (8.0, 0.02)}      # TPF floor, accuracy points allowed


def measured(family: str) -> dict:
    return json.loads((ROOT / MEASURED_BY[family]).read_text())["results"]


@pytest.mark.parametrize("family", list(SPEED_DIAL))
def test_points_match_the_measurement_and_the_rule(family):
    results = measured(family)
    ref = results["reference"]["accuracy"]["mean"]
    assert SPEED_DIAL[family]["exact"].setting == "reference"
    for speed, point in SPEED_DIAL[family].items():
        if point is None:
            continue
        r = results[point.setting]
        assert point.accuracy == pytest.approx(r["accuracy"]["mean"], abs=5e-4), speed
        assert point.tpf == pytest.approx(r["tpf"], abs=5e-3), speed
        want = {k: v for k, v in r["knobs"].items() if k != "steps"}
        assert point.knobs == want, speed
        if speed in RULES:
            floor, points = RULES[speed]
            assert r["tpf"] >= floor and r["accuracy"]["mean"] >= ref - points - 1e-9, speed


@pytest.mark.parametrize("family", list(SPEED_DIAL))
@pytest.mark.parametrize("speed", SPEEDS)
def test_points_build_valid_params(family, speed):
    if SPEED_DIAL[family][speed] is None:
        pytest.skip("no point")
    knobs, mode = speed_knobs(family, speed, 16)
    assert mode in ("none", "prefix", "dual")
    SamplingParams(max_tokens=16, block_length=16, **knobs).resolve()


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="^speed='turbo' is invalid"):
        speed_knobs("llada", "turbo", 16)
    with pytest.raises(ValueError, match="not measured for the 'mystery' family"):
        speed_knobs("mystery", "fast", 16)
