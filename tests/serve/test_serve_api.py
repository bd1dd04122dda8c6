"""The HTTP layer in-process (no Ray cluster): OpenAI routes, SSE, errors, guards, timeouts.

The same `build_api` + `OpenAIServer` as in the Serve ingress, over `LocalClient` and the small
`FakeEngine`, so every case runs in milliseconds.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from serve_fakes import FakeEngine, fake_card
from fastapi.testclient import TestClient

from dfastllm_ray.serve.api import build_api
from dfastllm_ray.serve.clients import LocalClient
from dfastllm_ray.serve.config import ModelConfig, RateLimitConfig, ServerSettings
from dfastllm_ray.serve.guards import ApiKeys, RateLimiter
from dfastllm_ray.serve.replica import ReplicaCore
from dfastllm_ray.serve.server import OpenAIServer


def make(engine: FakeEngine | None = None, card=None, **settings):
    engine = engine or FakeEngine()
    core = ReplicaCore(ModelConfig(model_id="fake"), engine, card or fake_card())
    cfg = ServerSettings(api_keys_env=None, **settings)
    server = OpenAIServer(cfg, {"fake": LocalClient(core)})
    limiter = None
    if cfg.rate_limit:
        limiter = RateLimiter(cfg.rate_limit.requests_per_second, cfg.rate_limit.burst)
    return build_api(server, ApiKeys(cfg.api_keys), limiter), engine, server


def events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_body_usage_and_request_id():
    app, engine, _ = make()
    r = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "hi"},
                             headers={"x-request-id": "abc123"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == "abc123" and body["id"] == "cmpl-abc123"
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abcdefgh"
    assert body["choices"][0]["finish_reason"] == "length"
    # BOS + 2 characters; 8 real generated tokens; 2 blocks = 2 forwards in the fake
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                             "nfe": 2}
    assert engine.seen[0][0] == [256, ord("h"), ord("i")]


def test_engine_ids_unique_even_when_clients_reuse_a_request_id():
    app, engine, _ = make(FakeEngine(step_delay_s=0.01))
    rs = asyncio.run(_concurrent(app, 3, {"model": "fake", "prompt": "x"},
                                 headers={"x-request-id": "same"}))
    assert all(r.status_code == 200 and r.json()["id"] == "cmpl-same" for r in rs)
    assert len(set(engine.request_ids)) == 3
    assert all(rid.startswith("same-") for rid in engine.request_ids)


def test_request_id_generated_when_absent():
    app, _, _ = make()
    r = TestClient(app).get("/health/live")
    assert r.status_code == 200 and len(r.headers["x-request-id"]) >= 16


def test_chat_uses_template_and_returns_message():
    app, engine, _ = make()
    r = TestClient(app).post("/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": "yo"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abcdefgh"}
    prompt = "".join(chr(t) for t in engine.seen[0][0])
    assert prompt == chr(256) + "<user>yo<assistant>"   # template text, encoded like a prompt


def test_stream_one_chunk_per_block_with_usage():
    app, _, _ = make()
    r = TestClient(app).post("/v1/completions", json={
        "model": "fake", "prompt": "hi", "stream": True, "max_tokens": 12,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    chunks, usage = ev[:3], ev[3]
    assert [c["choices"][0]["text"] for c in chunks] == ["abcd", "efgh", "ijkl"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["usage"] is None for c in chunks)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("content", ["", "   "])
def test_an_empty_message_is_a_valid_turn(content):
    """OpenAI accepts an empty user turn; the template's prompt goes to the model (the tiny
    models are trained to answer it with their greeting)."""
    app, engine, _ = make()
    r = TestClient(app).post("/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    assert "".join(chr(t) for t in engine.seen[0][0]) == chr(256) + f"<user>{content}<assistant>"


def test_chat_stream_first_delta_has_role():
    app, _, _ = make()
    r = TestClient(app).post("/v1/chat/completions", json={
        "model": "fake", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    ev = events(r.text)
    assert ev[0]["object"] == "chat.completion.chunk"
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": "abcd"}
    assert ev[1]["choices"][0]["delta"] == {"content": "efgh"}
    assert ev[-1] == "[DONE]" and "usage" not in ev[0]


def test_knobs_and_stop_reach_the_engine():
    app, engine, _ = make()
    r = TestClient(app).post("/v1/completions", json={
        "model": "fake", "prompt": "p", "max_tokens": 16, "steps": 8, "block_length": 8,
        "threshold": 0.9, "temperature": 0.5, "seed": 7, "stop": "\n", "remasking": "random"})
    assert r.status_code == 200, r.text
    p = engine.seen[0][1]
    assert (p.max_tokens, p.steps, p.block_length, p.threshold) == (16, 8, 8, 0.9)
    assert (p.temperature, p.seed, p.stop, p.remasking) == (0.5, 7, ("\n",), "random")


def test_n_choices_and_list_prompts():
    app, engine, _ = make()
    r = TestClient(app).post("/v1/completions", json={
        "model": "fake", "prompt": ["a", "b"], "n": 2, "seed": 1, "max_tokens": 4})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 16
    assert sorted(p.seed for _, p in engine.seen) == [1, 1, 2, 2]


BAD = [
    ("malformed JSON", b'{"model": "fake", "prompt": ', 400, None, "invalid_json"),
    ("missing prompt", {"model": "fake"}, 400, "prompt", None),
    ("missing model", {"prompt": "x"}, 400, "model", None),
    ("wrong type", {"model": "fake", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", None),
    ("negative max_tokens", {"model": "fake", "prompt": "x", "max_tokens": -5}, 400, "max_tokens", None),
    ("huge max_tokens", {"model": "fake", "prompt": "x", "max_tokens": 1_000_000}, 400, "max_tokens", None),
    ("prompt over context", {"model": "fake", "prompt": "x" * 300}, 400, "prompt",
     "context_length_exceeded"),
    ("prompt far over context", {"model": "fake", "prompt": "x" * 100_000}, 400, "prompt",
     "context_length_exceeded"),
    ("prompt + max_tokens over context", {"model": "fake", "prompt": "x" * 250}, 400,
     "max_tokens", None),
    ("empty prompt", {"model": "fake", "prompt": ""}, 400, "prompt", None),
    ("empty prompt list", {"model": "fake", "prompt": []}, 400, "prompt", None),
    ("token id outside vocab", {"model": "fake", "prompt": [1, 99999]}, 400, "prompt", None),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    ("bad threshold", {"model": "fake", "prompt": "x", "threshold": 2}, 400, "threshold", None),
    ("bad remasking", {"model": "fake", "prompt": "x", "remasking": "lol"}, 400, "remasking", None),
    ("steps vs blocks", {"model": "fake", "prompt": "x", "max_tokens": 8, "block_length": 4,
                         "steps": 3}, 400, "steps", None),
    ("unknown field", {"model": "fake", "prompt": "x", "stepz": 3}, 400, "stepz", None),
    ("unsupported", {"model": "fake", "prompt": "x", "logprobs": 2}, 400, "logprobs", None),
    ("n too large", {"model": "fake", "prompt": "x", "n": 100}, 400, "n", None),
]


@pytest.mark.parametrize("name,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_inputs(name, body, status, param, code):
    app, engine, _ = make()
    client = TestClient(app)
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code
    assert not engine.seen                                       # refused before the engine
    ok = client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert ok.status_code == 200                                 # and the server still serves


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}], "hello"])
def test_bad_chat_messages(messages):
    app, _, _ = make()
    r = TestClient(app).post("/v1/chat/completions", json={"model": "fake", "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_unknown_route_and_method_are_openai_errors():
    app, _, _ = make()
    c = TestClient(app)
    assert c.get("/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    r = c.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_api_keys_guard_v1_not_health():
    app, _, _ = make(api_keys=["sk-right"])
    c = TestClient(app)
    body = {"model": "fake", "prompt": "x"}
    assert c.post("/v1/completions", json=body).status_code == 401
    wrong = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models").status_code == 401
    ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-right"})
    assert ok.status_code == 200
    assert c.get("/health/live").status_code == 200


def test_api_keys_from_environment(monkeypatch):
    from dfastllm_ray.serve.guards import load_api_keys
    monkeypatch.setenv("TEST_KEYS", "a, b,")
    assert load_api_keys(["c"], "TEST_KEYS") == ["c", "a", "b"]


def test_rate_limit_429_with_retry_after():
    app, _, _ = make(rate_limit=RateLimitConfig(requests_per_second=0.5, burst=2))
    c = TestClient(app)
    codes = [c.post("/v1/completions", json={"model": "fake", "prompt": "x"}).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]
    r = c.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_token_bucket_refills():
    now = [0.0]
    rl = RateLimiter(rate_per_s=2.0, burst=1, clock=lambda: now[0])
    rl.acquire("a")
    with pytest.raises(Exception):
        rl.acquire("a")
    rl.acquire("b")                 # per client
    now[0] = 0.5
    rl.acquire("a")                 # one token back after 1 / rate seconds


async def _concurrent(app, n, body, headers=None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(n)))


def test_backpressure_is_503_not_a_hang():
    engine = FakeEngine(step_delay_s=0.05)
    app, _, _ = make(engine, max_concurrent_requests=2)
    rs = asyncio.run(_concurrent(app, 5, {"model": "fake", "prompt": "x"}))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503, 503]
    refused = next(r for r in rs if r.status_code == 503)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "overloaded"
    # refused at the gate: only the two admitted requests ever reached the engine
    assert len(engine.request_ids) == 2, engine.request_ids


def test_timeout_aborts_in_engine():
    engine = FakeEngine(step_delay_s=0.2)
    app, _, _ = make(engine, request_timeout_s=0.3)
    r = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": "x",
                                                      "max_tokens": 16},
                             headers={"x-request-id": "slow"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert len(engine.aborted) == 1 and engine.aborted[0].startswith("slow-")


def test_closing_a_stream_aborts_the_request():
    engine = FakeEngine(step_delay_s=0.05)
    _, _, server = make(engine)

    async def go():
        from dfastllm_ray.serve.protocol import CompletionRequest
        body = CompletionRequest(model="fake", prompt="x", stream=True, max_tokens=64)
        stream = await server.open_stream(await server.prepare(body, "gone"))
        first = await stream.__anext__()
        await stream.aclose()          # what Starlette does when the client disconnects
        return first

    assert asyncio.run(go()).startswith("data: ")
    assert len(engine.aborted) == 1 and engine.aborted[0].startswith("gone-")
    assert engine.running == 0


def test_health_ready_follows_engine():
    engine = FakeEngine()
    app, _, server = make(engine, health_poll_s=0.05)
    with TestClient(app) as c:          # runs the lifespan: the readiness watcher
        deadline = time.time() + 5
        while c.get("/health/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        assert c.get("/health").json()["models"] == {"fake": "ready"}
        engine.dead = True
        while c.get("/health/ready").status_code == 200 and time.time() < deadline:
            time.sleep(0.02)
        assert c.get("/health/ready").status_code == 503
        assert c.get("/health/live").status_code == 200


def test_models_and_stats_routes():
    app, _, _ = make()
    c = TestClient(app)
    c.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    assert c.get("/v1/models/fake").json()["max_model_len"] == 256
    assert c.get("/v1/models/nope").status_code == 404
    stats = c.get("/v1/engine/stats").json()["models"]["fake"]
    assert stats["replica"]["finished"] == 1 and stats["replica"]["generated_tokens"] == 8
    assert "num_running" in stats["engine"]


class NeverLoads(LocalClient):
    """A model whose replicas never start (a failed deploy): its card never comes."""
    async def card(self):
        await asyncio.sleep(3600)


def test_models_list_does_not_wait_for_a_model_that_never_loads():
    """One model's failed deploy must not make `/v1/models` a 503 (or a long wait) for the
    others; with no model loaded at all it is a bounded wait, then 503 + Retry-After."""
    core = ReplicaCore(ModelConfig(model_id="ok"), FakeEngine(), fake_card("ok"))
    settings = ServerSettings(api_keys_env=None, model_wait_s=0.2)
    server = OpenAIServer(settings, {"ok": LocalClient(core), "broken": NeverLoads(core)})
    c = TestClient(build_api(server, ApiKeys([])))
    data = c.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["ok"] and data[0]["max_model_len"] == 256
    assert c.get("/v1/models/broken").status_code == 503
    none = OpenAIServer(settings, {"broken": NeverLoads(core)})
    r = TestClient(build_api(none, ApiKeys([]))).get("/v1/models")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "overloaded"


def test_model_field_picks_the_model_and_ready_needs_all():
    engines = {"a": FakeEngine(), "b": FakeEngine()}
    clients = {m: LocalClient(ReplicaCore(ModelConfig(model_id=m), e, fake_card(m)))
               for m, e in engines.items()}
    server = OpenAIServer(ServerSettings(api_keys_env=None, health_poll_s=0.05), clients)
    with TestClient(build_api(server, ApiKeys([]))) as c:
        assert c.post("/v1/completions", json={"model": "b", "prompt": "x"}).status_code == 200
        assert (len(engines["a"].seen), len(engines["b"].seen)) == (0, 1)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["a", "b"]
        deadline = time.time() + 5
        while c.get("/health/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        engines["a"].dead = True
        while c.get("/health/ready").status_code == 200 and time.time() < deadline:
            time.sleep(0.02)
        assert c.get("/health/ready").json()["models"] == {"a": "not_ready", "b": "ready"}
