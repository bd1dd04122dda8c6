"""Input at the edges of the OpenAI API, in-process (fake engine): every bad body is a 4xx
OpenAI error naming the field, what was sent and what to send; nothing is a 500 or silently
ignored; usage counts a prompt once. Found by a new user's audit of `serve run configs/tiny.yaml`."""
from __future__ import annotations

from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from dfastllm_ray.serve.api import build_api
from dfastllm_ray.serve.clients import LocalClient
from dfastllm_ray.serve.config import ModelConfig, ServerSettings
from dfastllm_ray.serve.guards import ApiKeys
from dfastllm_ray.serve.replica import ReplicaCore
from dfastllm_ray.serve.server import OpenAIServer
from serve_fakes import FakeEngine, fake_card

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fake", "prompt": "hi"}
MASK_ID = 3


class RecordedMetrics:
    """IngressMetrics' `request` call, kept."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def request(self, model: str, route: str, outcome: str, latency_s: float) -> None:
        self.calls.append((model, route, outcome))


def client(metrics=None) -> TestClient:
    card = replace(fake_card(), mask_token_id=MASK_ID)
    core = ReplicaCore(ModelConfig(model_id="fake"), FakeEngine(), card)
    server = OpenAIServer(ServerSettings(api_keys_env=None), {"fake": LocalClient(core)})
    return TestClient(build_api(server, ApiKeys([]), metrics=metrics))


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("route,body,param,words", [
    ("/v1/completions", {**COMPLETION, "prompt": 5}, "prompt",
     ["a string", "a list of token ids", "(got 5)"]),
    ("/v1/completions", {**COMPLETION, "stop": 5}, "stop", ["a string or a list of strings"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", ["'image_url'", "text only"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages.0",
     ["needs content"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]},
     "messages.0", ["needs content"]),
    # Python's JSON parser reads NaN / Infinity (not JSON, but sent by some clients)
    ("/v1/completions", b'{"model": "fake", "prompt": "hi", "temperature": NaN}', "temperature",
     ["finite"]),
    ("/v1/completions", b'{"model": "fake", "prompt": "hi", "temperature": Infinity}',
     "temperature", ["finite"]),
    ("/v1/completions", {**COMPLETION, "steps": 10**9}, "steps", ["at most 8"]),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}},
     "stream_options", ["stream: true"]),
    ("/v1/completions", {**COMPLETION, "prompt": [1, MASK_ID, 2]}, "prompt",
     [f"token id {MASK_ID}", "no infilling"]),
])
def test_a_bad_field_is_a_400_that_names_it_and_what_it_must_be(route, body, param, words):
    sent = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(
        body, bytes) else {"json": body}
    err = error(client().post(route, **sent))
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert all(w in err["message"] for w in words), err["message"]


def test_unknown_and_missing_fields_have_their_own_codes():
    c = client()
    err = error(c.post("/v1/chat/completions", json={**CHAT, "messages": [
        {"role": "user", "content": "hi", "foo": 1}]}))
    assert (err["param"], err["code"]) == ("messages.0.foo", "unknown_field")
    err = error(c.post("/v1/completions", json={"prompt": "hi"}))
    assert (err["param"], err["code"]) == ("model", "missing_field")
    named = {**CHAT, "messages": [{"role": "user", "content": "hi", "name": "ann"}]}
    assert c.post("/v1/chat/completions", json=named).status_code == 200


@pytest.mark.parametrize("field,value", [("logprobs", 0), ("logprobs", 2), ("echo", True)])
def test_an_unsupported_value_says_so_and_how_to_fix_it(field, value):
    err = error(client().post("/v1/completions", json={**COMPLETION, field: value}))
    assert err["param"] == field and f"{field}={value!r}" in err["message"]
    assert "leave" in err["message"]


def test_openai_nulls_take_the_defaults():
    body = {**COMPLETION, "n": None, "stream": None, "logprobs": None, "temperature": None}
    r = client().post("/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


@pytest.mark.parametrize("content,headers,words", [
    (b"", {"content-type": "application/json"}, ["empty", "application/json"]),
    (b'{"model": "fake", "prompt": "hi"}', {"content-type": "text/plain"},
     ["Content-Type: text/plain", "application/json"]),
    (b"[1, 2]", {"content-type": "application/json"}, ["JSON object", "list"]),
    (b'{"model": "fake", "prompt": "\xff"}', {"content-type": "application/json"}, ["JSON"]),
])
def test_a_body_that_is_no_json_object_says_what_to_send(content, headers, words):
    err = error(client().post("/v1/completions", content=content, headers=headers))
    assert err["code"] in ("invalid_body", "invalid_json")
    assert all(w in err["message"] for w in words), err["message"]


def test_wrong_method_and_unknown_route_name_the_fix():
    c = client()
    err = error(c.get("/v1/completions"), 405)
    assert err["code"] == "method_not_allowed" and "use POST" in err["message"]
    err = error(c.post("/v1/nope", json={}), 404)
    assert err["code"] == "unknown_route" and "'/v1/nope'" in err["message"]


def test_prompt_tokens_count_each_prompt_once_whatever_n():
    c = client()
    one = c.post("/v1/completions", json=COMPLETION).json()["usage"]["prompt_tokens"]
    three = c.post("/v1/completions", json={**COMPLETION, "n": 3}).json()
    assert len(three["choices"]) == 3 and three["usage"]["prompt_tokens"] == one
    two = c.post("/v1/completions", json={**COMPLETION, "prompt": ["hi", "hi"], "n": 2}).json()
    assert len(two["choices"]) == 4 and two["usage"]["prompt_tokens"] == 2 * one
    streamed = c.post("/v1/completions", json={**COMPLETION, "n": 3, "stream": True,
                                               "stream_options": {"include_usage": True}})
    assert f'"prompt_tokens":{one},' in streamed.text


def test_tokenize_refuses_an_empty_chat_with_a_400():
    err = error(client().post("/tokenize", json={"model": "fake", "messages": []}))
    assert err["param"] == "messages"


def test_metrics_label_routes_not_paths():
    metrics = RecordedMetrics()
    c = client(metrics)
    c.post("/v1/completions", json=COMPLETION)
    c.get("/v1/models/fake")
    c.get("/v1/models/zzz")
    c.post("/v1/scan-1", json={})
    c.post("/v1/scan-2", json={})
    c.get("/v1/completions")
    c.post("/tokenize", json={"model": "fake", "prompt": "hi"})
    c.get("/health/ready")
    assert [(route, outcome) for _, route, outcome in metrics.calls] == [
        ("/v1/completions", "ok"), ("/v1/models/{model}", "ok"),
        ("/v1/models/{model}", "not_found"), ("unmatched", "not_found"),
        ("unmatched", "not_found"), ("/v1/completions", "method_not_allowed"),
        ("/tokenize", "ok")]
