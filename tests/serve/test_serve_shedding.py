"""Load shedding: a model at capacity refuses at once with 503 + Retry-After, before the request
is tokenized or reaches the engine; the batcher sheds globally with a refusal record; draining
admits nothing new. Counts only (no timing): the scripted engine holds requests on purpose.
"""
from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient
from serve_fakes import FakeEngine, fake_card
from test_serve_api import _concurrent

from dfastllm_ray.serve.api import build_api
from dfastllm_ray.serve.clients import LocalClient
from dfastllm_ray.serve.config import ModelConfig, ServerSettings
from dfastllm_ray.serve.guards import ApiKeys
from dfastllm_ray.serve.records import BlockOutput
from dfastllm_ray.serve.replica import ReplicaCore
from dfastllm_ray.serve.server import OpenAIServer

BODY = {"model": "fake", "prompt": "x", "max_tokens": 8, "block_length": 4}


def make_limited(limit: int, engine: FakeEngine, client_cls=LocalClient):
    core = ReplicaCore(ModelConfig(model_id="fake"), engine, fake_card())
    server = OpenAIServer(ServerSettings(api_keys_env=None), {"fake": client_cls(core)},
                          {"fake": limit})
    return build_api(server, ApiKeys([])), server


def test_model_at_capacity_refuses_before_the_engine():
    engine = FakeEngine(step_delay_s=0.05)
    app, server = make_limited(2, engine)
    rs = asyncio.run(_concurrent(app, 5, BODY))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503, 503], codes
    refused = [r for r in rs if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["code"] == "overloaded"
    assert "at capacity (2 requests admitted)" in refused[0].json()["error"]["message"]
    assert len(engine.seen) == 2                           # the refused never reached it
    assert server.admission.inflight == {"fake": 0} and server.admission.requests == 0
    assert server.admission.refused == 3


def test_n_choices_count_against_capacity():
    app, server = make_limited(3, FakeEngine())
    r = TestClient(app).post("/v1/completions", json={**BODY, "n": 4})
    assert r.status_code == 503                            # 4 choices never fit a cap of 3
    assert TestClient(app).post("/v1/completions", json={**BODY, "n": 3}).status_code == 200


def test_stats_report_admission():
    app, _ = make_limited(7, FakeEngine())
    c = TestClient(app)
    c.post("/v1/completions", json=BODY)
    ingress = c.get("/v1/engine/stats").json()["ingress"]
    assert ingress["limits"] == {"fake": 7} and ingress["admitted"] == {"fake": 0}


class SheddingClient(LocalClient):
    """A batcher at its global capacity: it answers with a refusal record."""

    async def _refuse(self, req):
        yield BlockOutput(req.request_id, "", 0, 0, finished=True, finish_reason="error",
                          error="The model is at capacity (4 requests); retry shortly.",
                          error_status=503)

    def generate(self, req):
        return self._refuse(req)


def test_batcher_refusal_record_is_503_with_retry_after():
    app, _ = make_limited(10, FakeEngine(), SheddingClient)
    for body in (BODY, {**BODY, "stream": True}):
        r = TestClient(app).post("/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["code"] == "overloaded"


def test_draining_admits_nothing_new():
    engine = FakeEngine()
    app, server = make_limited(10, engine)
    server.admission.draining = True
    r = TestClient(app).post("/v1/completions", json=BODY)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "shutting down" in r.json()["error"]["message"] and not engine.seen
