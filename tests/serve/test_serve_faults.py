"""Replica loss: 503 + Retry-After (never 500) for in-flight and new requests, an in-band error
event on streams, readiness 503 while no replica can serve, and service back without an app
restart. In-process with scripted engines (exact, milliseconds), then for real: the replica
actor killed under load on a real Ray Serve app.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from serve_fakes import FakeEngine
from test_serve_api import events, make

BODY = {"model": "fake", "prompt": "x", "max_tokens": 16, "block_length": 4}


class DyingEngine(FakeEngine):
    """Commits one block, then its replica "dies" (Ray raises ActorDiedError to the caller)."""

    async def generate(self, prompt_token_ids, params, request_id):
        async for out in super().generate(prompt_token_ids, params, request_id):
            yield out
            raise ActorDiedError()


class HangingEngine(FakeEngine):
    """A replica that stops answering: generation and pings hang until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.hang = False

    async def generate(self, prompt_token_ids, params, request_id):
        async for out in super().generate(prompt_token_ids, params, request_id):
            yield out
            if self.hang:
                await self.release.wait()

    async def _wait(self) -> None:
        if self.hang:
            await self.release.wait()

    def check_health(self):
        return self._wait()


def test_in_flight_unary_gets_503_with_retry_after():
    app, _, server = make(DyingEngine())
    r = TestClient(app).post("/v1/completions", json=BODY)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["error"]["code"] == "model_unavailable"
    assert server.health.suspected == 1      # the watcher probes at once (other replicas may live)


def test_stream_gets_an_error_event_then_done():
    app, _, _ = make(DyingEngine())
    r = TestClient(app).post("/v1/completions", json={**BODY, "stream": True})
    evs = events(r.text)
    assert evs[-1] == "[DONE]" and evs[-2]["error"]["code"] == "model_unavailable"
    assert evs[0]["choices"][0]["text"] == "abcd"              # the block sent before the loss


def test_hung_replica_turns_readiness_503_fails_requests_and_comes_back():
    engine = HangingEngine()
    app, _, server = make(engine, health_poll_s=0.05, health_timeout_s=0.2,
                          unavailable_wait_s=0.1, request_timeout_s=60)
    with TestClient(app) as c:
        deadline = time.time() + 10                            # bounded waits, not speed checks
        while c.get("/health/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        engine.hang = True
        r = c.post("/v1/completions", json=BODY)               # hangs, then fails when down
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        assert c.get("/health/ready").status_code == 503
        new = c.post("/v1/completions", json=BODY)             # a new request: bounded wait
        assert new.status_code == 503 and new.headers["retry-after"]
        engine.hang = False
        c.portal.call(engine.release.set)                      # on the app's event loop
        while c.get("/health/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        assert c.post("/v1/completions", json=BODY).status_code == 200


# ---- real Ray Serve: kill the replica actor mid-load --------------------------------------
FAULT_KEY = "k-fault"


def fault_args() -> dict:
    from serve_testutil import FAST_SHUTDOWN
    zero = {**FAST_SHUTDOWN, "ray_actor_options": {"num_cpus": 0}}
    return {"api_keys_env": None, "api_keys": [FAULT_KEY], "request_timeout_s": 60,
            "health_poll_s": 0.5, "health_timeout_s": 2, "ingress": zero,
            "models": [{"model_id": "fault", "engine_factory": "serve_fakes:build_fake_engine",
                        "batcher": {"deployment": zero},
                        "deployment": {**zero, "health_check_period_s": 1,
                                       "health_check_timeout_s": 2}}]}


@pytest.fixture(scope="module")
def fault_url(serve_url):
    from serve_testutil import ready_app
    yield from ready_app(serve_url, "fault", fault_args())


async def _load(url: str, n: int, stop: asyncio.Event) -> list:
    """n clients in a loop until `stop`: every outcome as (status, retry-after, error code)."""
    out: list = []
    headers = {"Authorization": f"Bearer {FAULT_KEY}"}
    body = {"model": "fault", "prompt": "x", "max_tokens": 64, "block_length": 4}

    async def client(c: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            if i % 2:
                r = await c.post("/v1/completions", json=body)
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
                out.append((r.status_code, r.headers.get("retry-after"), code))
                continue
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                text = (await r.aread()).decode()
            last = [ln for ln in text.splitlines() if ln.startswith("data: ")][-2:]
            out.append((r.status_code, r.headers.get("retry-after"),
                        "stream_error" if r.status_code == 200 and '"error"' in "".join(last)
                        else None))
            if r.status_code != 200:
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=90) as c:
        await asyncio.gather(*(client(c, i) for i in range(n)))
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_replica_killed_under_load(fault_url):
    import ray
    auth = {"Authorization": f"Bearer {FAULT_KEY}"}
    stats = httpx.get(f"{fault_url}/v1/engine/stats", headers=auth).json()["models"]["fault"]
    victim = ray.get_actor(stats["actor_name"], namespace="serve")

    async def scenario() -> tuple[list, list]:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(fault_url, 6, stop))
        await asyncio.sleep(1.0)
        ray.kill(victim, no_restart=True)
        ready: list = []
        async with httpx.AsyncClient(base_url=fault_url, timeout=10) as c:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:            # down, then back (no app restart)
                ready.append((await c.get("/health/ready")).status_code)
                if 503 in ready and ready[-1] == 200:
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)                          # some traffic after the recovery
        stop.set()
        return await load, ready

    outcomes, ready = asyncio.run(scenario())
    assert 503 in ready and ready[-1] == 200, ready[-20:]
    statuses = [s for s, _, _ in outcomes]
    assert 500 not in statuses and set(statuses) <= {200, 503}, outcomes
    assert all(ra for s, ra, _ in outcomes if s == 503)            # every refusal: Retry-After
    assert any(s == 200 for s in statuses[-3:]) or any(s == 200 for s in statuses)
    after = httpx.post(f"{fault_url}/v1/completions", headers=auth,
                       json={"model": "fault", "prompt": "x", "max_tokens": 8}, timeout=30)
    assert after.status_code == 200, after.text
    new = httpx.get(f"{fault_url}/v1/engine/stats", headers=auth).json()["models"]["fault"]
    assert new["actor_name"] != stats["actor_name"]                # a new replica, same app


def test_replica_loss_error_marks_the_model_down():
    """The stream from a replica fails with Ray's actor-death error: 503 model_unavailable,
    and the model is suspected at once (no wait for the next ping)."""
    from ray.exceptions import ActorDiedError

    from dfastllm_ray.serve.clients import LocalClient

    class LostClient(LocalClient):
        async def _lost(self, req):
            raise ActorDiedError()
            yield   # an async generator

        def generate(self, req):
            return self._lost(req)

    from dfastllm_ray.serve.api import build_api
    from dfastllm_ray.serve.config import ModelConfig, ServerSettings
    from dfastllm_ray.serve.guards import ApiKeys
    from dfastllm_ray.serve.replica import ReplicaCore
    from dfastllm_ray.serve.server import OpenAIServer
    from serve_fakes import fake_card
    core = ReplicaCore(ModelConfig(model_id="fake"), FakeEngine(), fake_card())
    server = OpenAIServer(ServerSettings(api_keys_env=None), {"fake": LostClient(core)})
    r = TestClient(build_api(server, ApiKeys([]))).post("/v1/completions", json=BODY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert r.headers["retry-after"] and server.health.suspected == 1


def test_busy_replica_is_not_marked_down_but_a_silent_one_is():
    """A ping that times out while blocks stream is a busy replica; one with no block during
    the ping is down (refusal records never count as blocks)."""
    from dfastllm_ray.serve.health import ModelHealth

    async def scenario():
        h = ModelHealth(["m"], poll_s=0.01, timeout_s=0.05, wait_s=0)

        async def slow_ping():
            await asyncio.sleep(1)

        async def streaming():
            for _ in range(20):
                h.progress("m")
                await asyncio.sleep(0.005)

        h.mark_up("m")
        await asyncio.gather(h.probe("m", slow_ping, known=True), streaming())
        busy_ok = h.healthy["m"]
        await h.probe("m", slow_ping, known=True)              # nothing streamed meanwhile
        return busy_ok, h.healthy["m"], "m" in h.down
    assert asyncio.run(scenario()) == (True, False, True)
