"""The model's cap holds over two ingress replicas together (real Ray Serve): each ingress
admits within the grant the batcher leased it, and the grants never pass the cap, so the
engine never runs more than `max_inflight` requests although each ingress alone would admit
that many. Counts only: the scripted engine holds each request ~1 s on purpose.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

KEY = "k-lease"
CAP = 4
BODY = {"model": "lease", "prompt": "x", "max_tokens": 100, "block_length": 1}  # 100 x 10 ms


def lease_args() -> dict:
    from serve_testutil import FAST_SHUTDOWN
    zero = {**FAST_SHUTDOWN, "ray_actor_options": {"num_cpus": 0}}
    return {"api_keys_env": None, "api_keys": [KEY], "request_timeout_s": 60,
            "ingress": {**zero, "num_replicas": 2},
            "models": [{"model_id": "lease", "engine_factory": "serve_fakes:build_fake_engine",
                        "max_inflight": CAP, "batcher": {"deployment": zero},
                        "deployment": {**zero, "max_ongoing_requests": 32}}]}


@pytest.fixture(scope="module")
def lease_url(serve_url):
    from serve_testutil import ready_app
    yield from ready_app(serve_url, "lease", lease_args())


async def _burst(url: str, n: int) -> tuple[list, list]:
    """n concurrent requests, while the engine's running count and the batcher's book are
    polled: (every response's (status, retry-after, code), the polled stats)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    polled: list = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
        async def one():
            r = await c.post("/v1/completions", json=BODY)
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            return r.status_code, r.headers.get("retry-after"), code

        async def poll(stop: asyncio.Event):
            while not stop.is_set():
                stats = (await c.get("/v1/engine/stats")).json()["models"]["lease"]
                polled.append(stats)
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        poller = asyncio.create_task(poll(stop))
        results = await asyncio.gather(*(one() for _ in range(n)))
        stop.set()
        await poller
    return results, polled


@pytest.mark.slow
@pytest.mark.ray
def test_cap_holds_over_two_ingress_replicas(lease_url):
    results, polled = [], []
    for _ in range(3):      # until both ingress replicas held a lease in one burst
        got, seen = asyncio.run(_burst(lease_url, 16))
        results += got
        polled += seen
        if max(s["batcher"]["ingresses"] for s in polled) == 2:
            break
    assert max(s["batcher"]["ingresses"] for s in polled) == 2, "one ingress took every request"
    assert max(s["engine"]["num_running"] for s in polled) <= CAP
    assert max(s["batcher"]["granted"] for s in polled) <= CAP
    statuses = {status for status, _, _ in results}
    assert statuses <= {200, 503} and 200 in statuses, results
    refused = [r for r in results if r[0] == 503]
    assert refused and all(ra and code == "overloaded" for _, ra, code in refused), refused
