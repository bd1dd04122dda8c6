"""The proxy gate's per-model caps (`proxy_gate.py`): with several models, the gate reads the
request's `model` from its body, refuses a full model with the ingress's wording and replays
the body to the app unchanged. Checked on counts and status codes, never on speed."""
from __future__ import annotations

import asyncio
import json

import pytest

from dfastllm_ray.serve import proxy_gate
from dfastllm_ray.serve.proxy_gate import MAX_PEEK_BYTES, ProxyGate, peek_model
from test_serve_proxy_gate import HeldApp, client, until

CAPS = {"a": 1, "b": 2}


class EchoHeldApp(HeldApp):
    """HeldApp that first reads the whole body, kept in `bodies`."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await super().__call__(scope, receive, send)


def test_a_full_model_is_refused_in_the_proxy_and_the_other_is_admitted():
    async def run() -> None:
        inner = EchoHeldApp()
        gate = ProxyGate(inner, max_inflight=3, model_caps=CAPS)
        async with client(gate) as c:
            held = [asyncio.create_task(c.post("/v1/completions", json={"model": "a"}))]
            await until(lambda: inner.entered == 1)
            r = await c.post("/v1/chat/completions", json={"model": "a", "messages": []})
            assert r.status_code == 503 and 1 <= int(r.headers["retry-after"]) <= 10
            err = r.json()["error"]
            assert err["code"] == "overloaded" and "'a' is at capacity (1 " in err["message"]
            held.append(asyncio.create_task(c.post("/v1/completions", json={"model": "b"})))
            await until(lambda: inner.entered == 2)
            assert gate.model_inflight == {"a": 1, "b": 1} and gate.inflight == 2
            held.append(asyncio.create_task(c.post("/v1/completions", json={"model": "zz"})))
            await until(lambda: inner.entered == 3)       # not capped here: the ingress's 404
            r = await c.post("/v1/completions", json={"model": "b"})
            assert r.status_code == 503 and "Too many requests" in r.json()["error"]["message"]
            assert gate.refused == 2
            inner.release.set()
            assert [(await t).status_code for t in held] == [200, 200, 200]
            assert gate.inflight == 0 and gate.model_inflight == {"a": 0, "b": 0}
            assert (await c.post("/v1/completions", json={"model": "a"})).status_code == 200
    asyncio.run(run())


@pytest.mark.parametrize("body", [json.dumps({"model": "a", "prompt": "é" * 100}).encode(),
                                  b"not json", b"[1, 2]", b'{"model": 7}', b"",
                                  # past the JSON parser's depth: RecursionError, once a 500
                                  b'{"model": "a", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_the_body_reaches_the_app_unchanged(body):
    async def run() -> None:
        inner = EchoHeldApp()
        inner.release.set()
        gate = ProxyGate(inner, max_inflight=3, model_caps=CAPS)
        async with client(gate) as c:
            r = await c.post("/v1/completions", content=body,
                             headers={"content-type": "application/json"})
        assert r.status_code == 200 and inner.bodies == [body]
        assert gate.inflight == 0 and gate.model_inflight == {"a": 0, "b": 0}
    asyncio.run(run())


def replay_of(messages: list[dict]):
    it = iter(messages)

    async def receive() -> dict:
        return next(it, None) or {"type": "http.disconnect"}
    return receive


def test_peek_reads_a_body_in_parts_and_replays_them_in_order():
    parts = [{"type": "http.request", "body": b'{"mo', "more_body": True},
             {"type": "http.request", "body": b'del": "b"}', "more_body": False}]

    async def run() -> None:
        model, receive = await peek_model(replay_of(parts))
        assert model == "b"
        assert [await receive() for _ in range(3)] == parts + [{"type": "http.disconnect"}]
    asyncio.run(run())


def test_peek_stops_at_a_disconnect_and_past_the_size_bound():
    left = [{"type": "http.request", "body": b'{"model"', "more_body": True},
            {"type": "http.disconnect"}]
    big = [{"type": "http.request", "body": b" " * (MAX_PEEK_BYTES + 1), "more_body": True},
           {"type": "http.request", "body": b'{"model": "a"}', "more_body": False}]

    async def run() -> None:
        model, receive = await peek_model(replay_of(left))
        assert model is None and [await receive() for _ in range(2)] == left
        model, receive = await peek_model(replay_of(big))
        assert model is None                                  # not parsed: only the first part read
        assert [await receive() for _ in range(2)] == big     # ... and the rest still comes
    asyncio.run(run())


def test_one_model_never_reads_the_body():
    async def run() -> None:
        inner = HeldApp()
        inner.release.set()
        gate = ProxyGate(inner, max_inflight=1, model_caps={"a": 1})
        calls = []

        async def receive() -> dict:
            calls.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            pass
        await gate({"type": "http", "method": "POST", "path": "/v1/completions",
                    "headers": []}, receive, send)
        assert calls == [] and gate.inflight == 0     # HeldApp never reads: nor does the gate
    asyncio.run(run())


def test_model_caps_from_the_env(monkeypatch):
    monkeypatch.delenv(proxy_gate.MODEL_CAPS_ENV, raising=False)
    monkeypatch.delenv(proxy_gate.DRAIN_FILE_ENV, raising=False)
    assert proxy_gate.model_caps_from_env() == {}
    monkeypatch.setenv(proxy_gate.MODEL_CAPS_ENV, '{"a": 1, "b": 2}')
    assert proxy_gate.model_caps_from_env() == CAPS
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, "3")
    (mw,) = proxy_gate.proxy_middlewares()
    assert mw.kwargs == {"max_inflight": 3, "model_caps": CAPS, "drain_file": None}
    for bad in ('{"a": 0}', '["a"]', '{"a": "1"}', "a=1"):
        monkeypatch.setenv(proxy_gate.MODEL_CAPS_ENV, bad)
        with pytest.raises(ValueError, match=proxy_gate.MODEL_CAPS_ENV):
            proxy_gate.model_caps_from_env()


class NotFoundApp:
    """Answers every request with a 404 as Serve's proxy (plain text) or as the ingress (JSON)."""

    def __init__(self, content_type: bytes) -> None:
        self.content_type = content_type

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", self.content_type)]})
        await send({"type": "http.response.body", "body": b"Path '/v1/completions' not found."})


@pytest.mark.parametrize("content_type,status", [(b"text/plain; charset=utf-8", 503),
                                                 (b"application/json", 404)])
def test_serve_own_404_before_the_app_is_deployed_is_a_503_to_retry(content_type, status):
    """Before the app is deployed Serve's proxy answers every path with a plain-text 404 (an
    OpenAI client's NotFoundError, never retried); the gate makes a generation request's a 503
    with Retry-After. The ingress's own JSON 404 (an unknown model) passes unchanged."""
    async def run() -> None:
        gate = ProxyGate(NotFoundApp(content_type), max_inflight=3, model_caps=CAPS)
        async with client(gate) as c:
            r = await c.post("/v1/completions", json={"model": "a"})
        assert r.status_code == status
        if status == 503:
            err = r.json()["error"]
            assert err["code"] == "model_unavailable" and "starting" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
        assert gate.inflight == 0 and gate.model_inflight == {"a": 0, "b": 0}
    asyncio.run(run())


@pytest.mark.parametrize("raw,value", [("", None), ("0", None), (" 12 ", 12)])
def test_max_inflight_from_the_env(monkeypatch, raw, value):
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, raw)
    assert proxy_gate.max_inflight_from_env() == value


@pytest.mark.parametrize("raw", ["-1", "many", "1.5"])
def test_a_bad_max_inflight_env_names_the_variable_and_the_rule(monkeypatch, raw):
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, raw)
    with pytest.raises(ValueError, match=rf"{proxy_gate.MAX_INFLIGHT_ENV}='{raw}' must be an "
                                         r"integer >= 0 .*0: no gate"):
        proxy_gate.max_inflight_from_env()
