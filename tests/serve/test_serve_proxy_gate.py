"""The proxy gate (`dfastllm_ray/serve/proxy_gate.py`): refusals inside Serve's proxy, past the
apps' admission caps, with the ingress's OpenAI body and Retry-After.

Requests are held in flight by an app that waits on an event (or, through real Serve, by a
client that has sent its headers and not its body), so every check is on counts and status
codes, never on how fast anything ran."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import httpx
import pytest

from dfastllm_ray.serve import launcher, proxy_gate
from dfastllm_ray.serve.proxy_gate import ProxyGate

BODY = {"model": "m", "prompt": "hi"}


class HeldApp:
    """An ASGI app whose generation responses wait for `release`; `entered` counts arrivals.
    With `chunks`, it streams that many body chunks, waiting for `release` before the last."""

    def __init__(self, chunks: int = 1) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.chunks = chunks
        self.arrived = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.entered += 1
        self.arrived.set()
        if scope["method"] == "POST" and scope["path"].endswith("completions"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(self.chunks - 1):
                await send({"type": "http.response.body", "body": b"data: x\n\n",
                            "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def until(cond) -> None:
    while not cond():
        await asyncio.sleep(0)


def test_refuses_past_cap_with_openai_body_and_retry_after():
    async def run() -> None:
        inner = HeldApp()
        gate = ProxyGate(inner, max_inflight=2)
        async with client(gate) as c:
            held = [asyncio.create_task(c.post("/v1/completions", json=BODY)) for _ in range(2)]
            await until(lambda: inner.entered == 2)
            r = await c.post("/v1/chat/completions", json=BODY, headers={"x-request-id": "r-1"})
            assert r.status_code == 503
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("server_error", "overloaded")
            assert 1 <= int(r.headers["retry-after"]) <= 10
            assert r.headers["x-request-id"] == "r-1"
            assert inner.entered == 2 and gate.refused == 1    # never reached the app
            inner.release.set()
            assert [(await t).status_code for t in held] == [200, 200]
            assert gate.inflight == 0
            assert (await c.post("/v1/completions", json=BODY)).status_code == 200
    asyncio.run(run())


def test_other_routes_pass_at_cap_and_prefixed_routes_are_gated():
    async def run() -> None:
        inner = HeldApp()
        gate = ProxyGate(inner, max_inflight=1)
        async with client(gate) as c:
            held = asyncio.create_task(c.post("/app/v1/completions", json=BODY))
            await until(lambda: inner.entered == 1)
            assert (await c.post("/app/v1/chat/completions", json=BODY)).status_code == 503
            for method, path in [("GET", "/health/ready"), ("POST", "/v1/tokenize"),
                                 ("GET", "/v1/models"), ("GET", "/v1/completions")]:
                assert (await c.request(method, path)).status_code == 200, path
            assert inner.entered == 5 and gate.refused == 1
            inner.release.set()
            await held
    asyncio.run(run())


def scope(path: str = "/v1/completions") -> dict:
    return {"type": "http", "method": "POST", "path": path, "headers": []}


async def call(app, sent: list) -> None:
    """One request straight through ASGI (httpx's ASGITransport buffers a whole stream)."""
    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)
    await app(scope(), receive, send)


def test_a_stream_holds_its_place_until_its_last_chunk():
    async def run() -> None:
        inner = HeldApp(chunks=3)
        gate = ProxyGate(inner, max_inflight=1)
        stream: list = []
        task = asyncio.create_task(call(gate, stream))
        await until(lambda: len(stream) == 3)          # headers and two chunks are out
        refused: list = []
        await call(gate, refused)
        assert refused[0]["status"] == 503 and gate.inflight == 1
        inner.release.set()
        await task
        assert stream[-1]["body"] == b"data: [DONE]\n\n" and gate.inflight == 0
        admitted: list = []
        inner.release = asyncio.Event()
        inner.release.set()
        await call(gate, admitted)
        assert admitted[0]["status"] == 200
    asyncio.run(run())


def test_retry_after_follows_the_latency_of_admitted_requests():
    async def run() -> list[int]:
        inner = HeldApp()
        gate = ProxyGate(inner, max_inflight=1)
        gate.latency_s = 100.0                 # a slot frees about this often: capped at 10 s
        async with client(gate) as c:
            held = asyncio.create_task(c.post("/v1/completions", json=BODY))
            await until(lambda: inner.entered == 1)
            waits = [int((await c.post("/v1/completions", json=BODY)).headers["retry-after"])
                     for _ in range(5)]
            inner.release.set()
            await held
        return waits
    assert asyncio.run(run()) == [10] * 5


def test_proxy_middlewares_read_the_cap_from_the_env(monkeypatch):
    monkeypatch.delenv(proxy_gate.MAX_INFLIGHT_ENV, raising=False)
    monkeypatch.delenv(proxy_gate.DRAIN_FILE_ENV, raising=False)
    assert proxy_gate.proxy_middlewares() == []
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, "0")         # explicitly off
    assert proxy_gate.proxy_middlewares() == []
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, "7")
    (mw,) = proxy_gate.proxy_middlewares()
    assert mw.cls is ProxyGate and mw.kwargs == {"max_inflight": 7, "model_caps": {},
                                                 "drain_file": None}
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, "seven")
    with pytest.raises(ValueError, match=proxy_gate.MAX_INFLIGHT_ENV):
        proxy_gate.proxy_middlewares()


def test_launcher_installs_the_gate_at_the_sum_of_the_models_caps(monkeypatch):
    from serve_testutil import tiny_config
    cfg = tiny_config()
    for env in (proxy_gate.CALLBACK_ENV, proxy_gate.MAX_INFLIGHT_ENV, proxy_gate.MODEL_CAPS_ENV):
        monkeypatch.delenv(env, raising=False)
    # tiny.yaml: two models, each 2 x max_num_seqs (32) x 1 replica
    assert launcher.install_proxy_gate(cfg) == 128
    assert os.environ[proxy_gate.CALLBACK_ENV] == proxy_gate.CALLBACK
    assert os.environ[proxy_gate.MAX_INFLIGHT_ENV] == "128"
    assert proxy_gate.model_caps_from_env() == {"tiny-llada": 64, "tiny-dream": 64}
    file_env = cfg["controller_options"]["runtime_env"]["env_vars"]  # the proxy's env wins there
    assert file_env[proxy_gate.MAX_INFLIGHT_ENV] == "128"
    monkeypatch.delenv(proxy_gate.MODEL_CAPS_ENV)
    cfg["applications"][0]["args"]["models"][0]["max_inflight"] = 10
    monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, "0")           # an explicit value wins
    assert launcher.install_proxy_gate(cfg) is None
    assert file_env[proxy_gate.MAX_INFLIGHT_ENV] == "0"             # ... in the proxy too
    monkeypatch.delenv(proxy_gate.MAX_INFLIGHT_ENV)
    file_env[proxy_gate.MAX_INFLIGHT_ENV] = "128"                  # stale: a model's cap changed
    assert launcher.install_proxy_gate(cfg) == 10 + 64             # the apps as they are now
    assert file_env[proxy_gate.MAX_INFLIGHT_ENV] == "74"
    assert file_env[proxy_gate.MODEL_CAPS_ENV] == '{"tiny-llada":10,"tiny-dream":64}'
    monkeypatch.setenv(proxy_gate.CALLBACK_ENV, "other.module:callback")
    monkeypatch.delenv(proxy_gate.MAX_INFLIGHT_ENV)
    assert launcher.install_proxy_gate(cfg) is None                # never replaces another
    assert proxy_gate.MAX_INFLIGHT_ENV not in os.environ
    assert proxy_gate.CALLBACK_ENV not in file_env
    monkeypatch.delenv(proxy_gate.CALLBACK_ENV)
    assert launcher.install_proxy_gate({"applications": [{"import_path": "x:y"}]}) is None


def test_gate_paths_are_the_api_generation_paths():
    from dfastllm_ray.serve.api import GENERATION_PATHS
    assert proxy_gate.GENERATION_PATHS == GENERATION_PATHS


def _held_request(port: int) -> tuple[socket.socket, bytes]:
    """A generation request whose headers are sent and whose body is not: in flight until the
    rest of the body comes. Returns the socket and the rest of the body."""
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "tiny-llada", "prompt": "hi", "max_tokens": 8}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
    sock.settimeout(120)
    return sock, body[5:]


def _read_response(sock: socket.socket) -> tuple[str, str]:
    """(head, body) of one HTTP response: headers and body may come in separate segments."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


def _length(data: bytes) -> int:
    head = data.partition(b"\r\n\r\n")[0].decode().lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                 if line.startswith("content-length:")), 0)


def assert_one_refused_by_the_proxy(url: str, held: list[tuple[socket.socket, bytes]]) -> None:
    """Of two held requests with the gate capped at 1, the second to reach it is answered at
    once with the OpenAI 503 and Retry-After; the other is served once its body comes; the
    ingress refused nothing (the proxy did)."""
    import select
    ready, _, _ = select.select([s for s, _ in held], [], [], 120)
    assert len(ready) == 1
    head, text = _read_response(ready[0])
    assert head.startswith("HTTP/1.1 503") and "retry-after:" in head.lower()
    assert json.loads(text)["error"]["code"] == "overloaded"
    sock, rest = next(h for h in held if h[0] is not ready[0])
    sock.sendall(rest)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    for s, _ in held:
        s.close()
    assert httpx.get(f"{url}/v1/engine/stats", timeout=30).json()["ingress"]["refused"] == 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.fresh_cluster
def test_launcher_proxy_refuses_before_the_ingress(tmp_path):
    """Through real Serve, the gate capped at 1: of two requests held in flight (headers sent,
    body not), exactly one is refused at once with the OpenAI 503 and Retry-After, by the proxy
    (the ingress, capped at 64 per model, refuses nothing); the other is served once its body
    comes, and the place is free again after it."""
    from app_process import start_app, stop_app, tiny_app
    from serve_testutil import ROOT
    path, port, env = tiny_app(tmp_path)
    env = {**env, proxy_gate.MAX_INFLIGHT_ENV: "1"}
    env.pop(proxy_gate.CALLBACK_ENV, None)
    url = f"http://127.0.0.1:{port}"
    proc = start_app([sys.executable, "-m", "dfastllm_ray.serve", "run", str(path)], url, env,
                     tmp_path / "launcher.log", ROOT)
    try:
        held = [_held_request(port), _held_request(port)]
        assert_one_refused_by_the_proxy(url, held)
        body = {"model": "tiny-llada", "prompt": "hi", "max_tokens": 8}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        stop_app(proc, 60)


def test_the_drain_file_closes_the_gate_to_new_generation_requests(tmp_path):
    """Once the launcher's drain file exists, a generation request gets the draining 503 (with
    Retry-After) and never reaches the app; requests already admitted finish; other routes
    (health) still pass."""
    from dfastllm_ray.serve.admission import DRAINING
    flag = tmp_path / "draining"

    async def run() -> None:
        inner = HeldApp()
        gate = ProxyGate(inner, max_inflight=8, drain_file=str(flag))
        async with client(gate) as c:
            held = asyncio.create_task(c.post("/v1/completions", json=BODY))
            await until(lambda: inner.entered == 1)
            flag.touch()                                      # the launcher's SIGTERM handler
            r = await c.post("/v1/completions", json=BODY)
            assert r.status_code == 503 and r.json()["error"]["message"] == DRAINING
            assert int(r.headers["retry-after"]) >= 1 and inner.entered == 1
            assert (await c.get("/health/ready")).status_code == 200 and inner.entered == 2
            inner.release.set()
            assert (await held).status_code == 200            # admitted before: finished
    asyncio.run(run())


def test_the_launcher_arms_the_drain_file_and_its_signal_handler_creates_it(monkeypatch):
    import threading
    monkeypatch.setenv(proxy_gate.DRAIN_FILE_ENV, "")      # so the test's end restores it
    path = launcher.arm_drain_file()
    try:
        assert os.environ[proxy_gate.DRAIN_FILE_ENV] == str(path) and not path.exists()
        monkeypatch.setenv(proxy_gate.MAX_INFLIGHT_ENV, "4")
        (gate,) = proxy_gate.proxy_middlewares()        # in the proxy: it reads the file's path
        assert gate.kwargs["drain_file"] == str(path)
        stop = threading.Event()
        launcher.on_signal(stop, path)(15, None)
        assert path.exists() and stop.is_set()
    finally:
        import shutil
        shutil.rmtree(path.parent, ignore_errors=True)
