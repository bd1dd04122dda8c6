"""The speed dial, the request's cache mode and the newer policies' knobs over HTTP: they reach
the engine as SamplingParams fields, and a bad value is an OpenAI-style 400 naming the field."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from test_serve_api import make


@pytest.mark.parametrize("fields", [{"speed": "fast"}, {"kv_cache_mode": "none"},
                                    {"revoke_threshold": 0.9}, {"kl_threshold": 0.02},
                                    {"pc_lambda": 0.25}, {"exit_high": 0.9, "exit_low": 0.6}])
def test_policy_fields_reach_the_engine(fields):
    app, engine, _ = make()
    r = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "p",
                                                      "max_tokens": 8, **fields})
    assert r.status_code == 200, r.text
    p = engine.seen[0][1]
    assert {k: getattr(p, k) for k in fields} == fields


@pytest.mark.parametrize("field,value", [("speed", "ludicrous"), ("kv_cache_mode", "fast"),
                                         ("revoke_threshold", 1.5), ("kl_history", 0)])
def test_bad_policy_fields_are_400_naming_the_field(field, value):
    app, _, _ = make()
    r = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "p",
                                                      "max_tokens": 8, field: value})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
