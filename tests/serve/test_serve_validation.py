"""Every knob at its bound and just past it: a 400 naming the field, the value and the bound,
before the engine sees the request; and `max_tokens` off the block grid served exactly.

In-process (the FakeEngine behind the real HTTP layer), plus the offline `LLM` on the shipped
tiny model for the canvas-rounding equivalence.
"""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from serve_fakes import FakeEngine, Out, fake_card
from test_serve_api import events, make

from dfastllm_ray.output_limit import OutputCut
from dfastllm_ray.sampling.params import MAX_STOP, SamplingParams

CONTEXT = 256          # fake_card's context; the prompt "x" is 2 tokens (BOS + 1)

# (name, extra body fields at the bound (accepted), the same past it (refused), param, bound text)
BOUNDS = [
    ("steps", {"max_tokens": 8, "block_length": 4, "steps": 8},
     {"max_tokens": 8, "block_length": 4, "steps": 10}, "steps", "at most 8"),
    ("steps huge", {"max_tokens": 8, "block_length": 4, "steps": 8},
     {"max_tokens": 8, "block_length": 4, "steps": 10**9}, "steps", "at most"),
    ("max_tokens", {"max_tokens": CONTEXT - 2, "block_length": 2},
     {"max_tokens": CONTEXT - 1, "block_length": 2}, "max_tokens", f"at most {CONTEXT - 2}"),
    ("seed", {"seed": 2**64 - 1}, {"seed": 2**64}, "seed", "18446744073709551615"),
    ("negative seed", {"seed": 0}, {"seed": -1}, "seed", "greater than or equal to 0"),
    ("n", {"n": 8}, {"n": 9}, "n", "at most 8"),
    ("stop count", {"stop": [f"s{i}" for i in range(MAX_STOP)]},
     {"stop": [f"s{i}" for i in range(MAX_STOP + 1)]}, "stop", f"at most {MAX_STOP}"),
    ("stop length", {"stop": "z" * 256}, {"stop": "z" * 257}, "stop", "at most 256"),
    ("empty stop", {"stop": "z"}, {"stop": ""}, "stop", "non-empty"),
    ("top_p on LLaDA", {"top_p": 1.0}, {"top_p": 0.9}, "top_p", "LLaDA-family"),
    ("top_k on LLaDA", {}, {"top_k": 5}, "top_k", "does not use"),
    ("eps on LLaDA", {"eps": 1e-3}, {"eps": 0.01}, "eps", "does not use"),
    ("alg_temp on LLaDA", {}, {"alg_temp": 0.5}, "alg_temp", "does not use"),
]


@pytest.mark.parametrize("name,ok,bad,param,bound", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_knob_bounds(name, ok, bad, param, bound):
    app, engine, _ = make()
    client = TestClient(app)
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", **bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    value = bad[param]
    shown = json.dumps(value) if not isinstance(value, str) else value
    assert err["param"] == param and bound in err["message"], err
    assert str(value)[:40] in err["message"] or shown[:40] in err["message"], err
    assert not engine.seen                                   # refused before the engine
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", **ok})
    assert r.status_code == 200, r.text


def test_prompt_length_bound():
    app, engine, _ = make()
    client = TestClient(app)
    at = client.post("/v1/completions", json={"model": "fake", "prompt": [1] * (CONTEXT - 1),
                                              "max_tokens": 1, "block_length": 1})
    assert at.status_code == 200, at.text
    past = client.post("/v1/completions", json={"model": "fake", "prompt": [1] * CONTEXT,
                                                "max_tokens": 1})
    assert past.status_code == 400 and past.json()["error"]["param"] == "prompt"
    assert f"{CONTEXT} tokens" in past.json()["error"]["message"]


@pytest.mark.parametrize("knob,value", [("remasking", "random"), ("logits_eos_inf", True),
                                        ("factor", 1.0), ("entropy_bound", 0.5)])
def test_llada_knobs_refused_on_dream(knob, value):
    app, engine, _ = make(card=fake_card(arch="dream"))
    r = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "x",
                                                       knob: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == knob, r.text
    assert "Dream-family" in r.json()["error"]["message"] and not engine.seen
    ok = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "x",
                                                        "top_p": 0.9, "top_k": 5})
    assert ok.status_code == 200 and engine.seen[0][1].top_p == 0.9   # Dream's own: applied


@pytest.mark.parametrize("max_tokens", [1, 5, 7, 9, 13])
def test_max_tokens_off_the_block_grid(max_tokens):
    app, engine, _ = make()
    client = TestClient(app)
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x",
                                             "max_tokens": max_tokens, "block_length": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == max_tokens
    assert len(body["choices"][0]["text"]) == max_tokens
    assert body["choices"][0]["finish_reason"] == "length"
    p = engine.seen[0][1]
    assert p.max_tokens % p.block_length == 0 and p.max_tokens - p.block_length < max_tokens


def test_max_tokens_off_the_grid_streams_cut_and_counted():
    app, _, _ = make()
    r = TestClient(app).post("/v1/completions", json={
        "model": "fake", "prompt": "x", "max_tokens": 10, "block_length": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs[:-1] if e["choices"]]
    assert [len(c["choices"][0]["text"]) for c in chunks] == [4, 4, 2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert evs[-2]["usage"]["completion_tokens"] == 10


def test_output_cut_keeps_the_first_tokens():
    cut = OutputCut(5, lambda ids: "".join(chr(i) for i in ids))
    first = Out("r", "abcd", "abcd", [97, 98, 99, 100], [97, 98, 99, 100], False, None, 1, 2)
    assert cut(first) is first
    last = Out("r", "abcdefgh", "efgh", list(range(97, 105)), list(range(101, 105)), True,
               "stop", 2, 2)
    out = cut(last)
    assert (out.text, out.delta_text, out.token_ids, out.delta_token_ids) == (
        "abcde", "e", [97, 98, 99, 100, 101], [101])
    assert out.finished and out.finish_reason == "length"
    assert OutputCut(None, str)(last) is last


def test_resolve_rounds_the_canvas_and_keeps_the_limit():
    p = SamplingParams(max_tokens=100, block_length=32).resolve(256, 10)
    assert (p.max_tokens, p.block_length, p.steps, p.output_limit) == (128, 32, 128, 100)
    assert p.resolve(256, 10) == p                              # idempotent (the engine re-resolves)
    # the rounded canvas would overflow the context: a block that divides max_tokens instead
    q = SamplingParams(max_tokens=230, block_length=8).resolve(256, 26)
    assert (q.max_tokens, q.block_length, q.output_limit) == (230, 5, None)
    with pytest.raises(ValueError, match=r"^steps=96 is invalid: must be a multiple"):
        SamplingParams(max_tokens=100, block_length=8, steps=96)   # 13 blocks


def test_offline_llm_cut_equals_the_whole_canvas_prefix():
    """max_tokens=20 on blocks of 8 decodes the 24-position canvas: the same tokens as asking
    for 24 with the same schedule, cut at 20."""
    from dfastllm_ray import LLM
    from dfastllm_ray.serve.config import shipped_tiny_model
    llm = LLM(model=shipped_tiny_model(), device="cpu", dtype="float32")
    knobs = dict(block_length=8, steps=24, early_exit=False)
    cut = llm.generate(["sort 31842"], SamplingParams(max_tokens=20, **knobs), use_tqdm=False)[0]
    whole = llm.generate(["sort 31842"], SamplingParams(max_tokens=24, **knobs), use_tqdm=False)[0]
    assert len(cut.token_ids) <= 20
    assert cut.token_ids == whole.token_ids[:20]
    if len(whole.token_ids) > 20:
        assert cut.finish_reason == "length"


def test_engine_side_refusal_is_a_record_not_an_exception(caplog):
    """An engine-side 400 (cfg_scale, refused by the engine) fails its own request: the replica
    yields a refusal record instead of raising (Serve would log a raised exception as an ERROR
    traceback), logged at INFO; the ingress answers 400 naming the field."""
    import asyncio

    from dfastllm_ray.serve.config import ModelConfig
    from dfastllm_ray.serve.records import GenerateRequest
    from dfastllm_ray.serve.replica import ReplicaCore

    class Refusing(FakeEngine):
        async def generate(self, prompt_token_ids, params, request_id):
            raise ValueError("cfg_scale=1.0 is not supported by the engine")
            yield  # pragma: no cover

    core = ReplicaCore(ModelConfig(model_id="fake"), Refusing(), fake_card())
    req = GenerateRequest("r-0", [1, 2], SamplingParams(max_tokens=4).resolve())

    async def drain():
        return [out async for out in core.generate(req)]
    with caplog.at_level("INFO", logger="ray.serve.dfastllm"):
        (out,) = asyncio.run(drain())
    assert out.finished and out.error.startswith("cfg_scale=1.0")
    assert core.counters.failed == 1
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR" or rec.exc_info]
    app, _, _ = make(Refusing())
    r = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "x",
                                                       "cfg_scale": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cfg_scale"


def test_required_api_keys_refuse_to_serve_openly(monkeypatch):
    """`api_keys_required: true` and no key (a secret that was not mounted): the ingress's start
    fails naming the variable; off (the default), no key is auth off, as documented."""
    from dfastllm_ray.serve.config import AppArgs
    from dfastllm_ray.serve.guards import load_api_keys
    monkeypatch.delenv("MY_KEYS", raising=False)
    settings = AppArgs.parse({"models": [{"model_id": "m"}], "api_keys_env": "MY_KEYS",
                              "api_keys_required": True}).server_settings()
    with pytest.raises(ValueError, match=r"api_keys_required=true, but api_keys is empty and "
                                         r"the environment variable MY_KEYS is unset or empty"):
        load_api_keys(settings.api_keys, settings.api_keys_env, settings.api_keys_required)
    with pytest.raises(ValueError, match="api_keys_env is null"):
        load_api_keys([], None, required=True)
    monkeypatch.setenv("MY_KEYS", "k1, k2")
    assert load_api_keys(settings.api_keys, settings.api_keys_env, True) == ["k1", "k2"]
    assert load_api_keys(["k"], None, True) == ["k"]
    monkeypatch.delenv("MY_KEYS")
    assert load_api_keys([], "MY_KEYS", required=False) == []
