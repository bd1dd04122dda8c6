"""Load shedding: a model at capacity refuses at once with 503 + Retry-After, before the request
is tokenized or reaches the engine; the batcher's refusal (global cap) is a refusal record; draining
admits nothing new. Counts only (no timing): the scripted engine holds requests on purpose.
"""
from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient
from serve_fakes import FakeEngine, fake_card
from test_serve_api import _concurrent

from dfastllm_ray.serve.api import build_api
from dfastllm_ray.serve.clients import LocalClient, at_capacity_record
from dfastllm_ray.serve.config import ModelConfig, ServerSettings
from dfastllm_ray.serve.guards import ApiKeys
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
    assert len(server.admission.refusal_s) == 3 and server.admission.refusal_p99_ms() >= 0


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
        yield at_capacity_record(req.request_id, 4)

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


def test_tokenizer_routes_follow_vllm():
    app, _ = make_limited(10, FakeEngine())
    c = TestClient(app)
    info = c.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "CharTokenizer" and info["model_max_length"] == 256
    t = c.post("/tokenize", json={"prompt": "hi"}).json()
    assert t == {"count": 3, "max_model_len": 256, "tokens": [256, 104, 105], "token_strs": None}
    assert c.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}
                  ).json()["tokens"] == [104, 105]
    chat = c.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "yo"}]}).json()
    assert chat["count"] == len("<user>yo<assistant>") + 1
    assert c.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    bad = c.post("/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_openapi_behind_auth_and_documents_real_statuses():
    core = ReplicaCore(ModelConfig(model_id="fake"), FakeEngine(), fake_card())
    server = OpenAIServer(ServerSettings(api_keys_env=None), {"fake": LocalClient(core)})
    c = TestClient(build_api(server, ApiKeys(["sk-1"])))
    assert c.get("/openapi.json").status_code == 401
    doc = c.get("/openapi.json", headers={"Authorization": "Bearer sk-1"}).json()
    op = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "429", "503", "504"} <= set(op) and "422" not in op
    assert "text/event-stream" in op["200"]["content"]
    assert "Retry-After" in op["503"]["headers"]


def test_models_list_is_complete():
    app, _ = make_limited(10, FakeEngine())
    data = TestClient(app).get("/v1/models").json()["data"]
    assert data[0]["id"] == "fake" and data[0]["max_model_len"] == 256
    assert "created" in data[0]


def test_saturated_refusal_comes_before_body_parsing():
    """While every model is full, a generation is refused by the middleware: even a body that
    is not JSON gets the 503 (nothing was parsed), with Retry-After."""
    app, server = make_limited(1, FakeEngine())
    server.admission.enter("fake", 1)                       # the model's only slot is taken
    r = TestClient(app).post("/v1/completions", content=b"{not json",
                             headers={"content-type": "application/json"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "at capacity" in r.json()["error"]["message"]
    server.admission.leave("fake", 1, None)
    assert TestClient(app).post("/v1/completions", json=BODY).status_code == 200


def test_stream_left_mid_way_is_counted_client_closed():
    """The access record of a response whose last body part was never sent (the client left a
    stream) is 499 / client_closed, not 200 / ok."""
    from dfastllm_ray.serve.api import OUTCOMES, RequestContext

    seen = []

    class Metrics:
        def request(self, model, route, outcome, seconds):
            seen.append(outcome)

    async def left_mid_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})

    async def whole(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(app):
        async def send(message):
            pass
        scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": []}
        await RequestContext(app, Metrics(), add_header=False)(scope, None, send)

    asyncio.run(run(left_mid_stream))
    asyncio.run(run(whole))
    assert seen == [OUTCOMES[499], OUTCOMES[200]] == ["client_closed", "ok"]


def test_tokenizer_routes_with_the_shipped_tokenizer():
    """The same routes over the real tokenizer of the shipped tiny model: ids round-trip, the
    chat form equals what a chat completion would send, and the info names its special tokens."""
    from transformers import AutoTokenizer

    from dfastllm_ray.serve.config import shipped_tiny_model
    from dfastllm_ray.serve.prompts import encode_chat
    from dfastllm_ray.serve.records import ModelCard
    tok = AutoTokenizer.from_pretrained(shipped_tiny_model())
    card = ModelCard("tiny", tok, 256, len(tok), {"max_tokens": 8, "block_length": 8}, None, 1)
    core = ReplicaCore(ModelConfig(model_id="tiny"), FakeEngine(), card)
    server = OpenAIServer(ServerSettings(api_keys_env=None), {"tiny": LocalClient(core)})
    c = TestClient(build_api(server, ApiKeys([])))
    info = c.get("/tokenizer_info").json()
    assert info["model_max_length"] == 256 and info["eos_token"] == tok.eos_token
    t = c.post("/tokenize", json={"prompt": "sort 31842", "return_token_strs": True}).json()
    assert t["tokens"] == tok("sort 31842")["input_ids"] and len(t["token_strs"]) == t["count"]
    back = c.post("/detokenize", json={"tokens": t["tokens"]}).json()["prompt"]
    assert "sort 31842" in back
    msgs = [{"role": "user", "content": "add 1+2"}]
    chat = c.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    assert chat == encode_chat(tok, msgs)


def test_burst_is_refused_at_the_front_before_any_body_comes_in():
    """Three generations arrive while no body has been received yet and the model takes two:
    the third is refused without its body ever being read (the front gate counts the places
    of requests let in but not parsed yet); the first two are served once their bodies come
    in, and a request that fails before `generate` (422) gives its place back."""
    import json

    app, server = make_limited(2, FakeEngine())
    body = json.dumps(BODY).encode()

    async def call(gate: asyncio.Event, reads: list[int]) -> int:
        status: list[int] = []

        async def receive():
            reads.append(1)
            await gate.wait()
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers":
                 [(b"content-type", b"application/json")], "query_string": b"",
                 "client": ("127.0.0.1", 1), "server": ("t", 80), "scheme": "http",
                 "root_path": "", "http_version": "1.1"}
        await app(scope, receive, send)
        return status[0]

    async def burst():
        gate, reads = asyncio.Event(), [[], [], []]
        tasks = [asyncio.create_task(call(gate, r)) for r in reads]
        await asyncio.sleep(0.05)                      # all three entered; no body yet
        held = server.admission.pending
        gate.set()
        return [await t for t in tasks], [len(r) for r in reads], held

    codes, reads, held = asyncio.run(burst())
    assert sorted(codes) == [200, 200, 503] and held == 2
    assert reads[codes.index(503)] == 0                 # refused before its body was read
    assert server.admission.pending == 0 and server.admission.requests == 0
    bad = TestClient(app).post("/v1/completions", json={"model": "fake", "prompt": 5})
    assert bad.status_code == 400 and server.admission.pending == 0


def test_tokenizer_routes_without_model_when_models_share_a_tokenizer():
    """lm-eval never names the model on /tokenizer_info and /tokenize: with two models on one
    vocabulary (configs/tiny.yaml's pair) the unnamed routes answer as the named ones do; with
    two different tokenizers they are a 400 asking for `model`."""
    from transformers import AutoTokenizer

    from dfastllm_ray.serve.records import ModelCard

    def app_of(tokenizers: dict) -> TestClient:
        clients = {}
        for name, tok in tokenizers.items():
            card = ModelCard(name, tok, 256, 112, {"max_tokens": 8, "block_length": 8}, None, 1)
            clients[name] = LocalClient(ReplicaCore(ModelConfig(model_id=name), FakeEngine(),
                                                    card))
        return TestClient(build_api(OpenAIServer(ServerSettings(api_keys_env=None), clients),
                                    ApiKeys([])))

    from pathlib import Path

    from dfastllm_ray.serve.config import shipped_tiny_model
    assets = Path(shipped_tiny_model()).parent
    pair = app_of({m: AutoTokenizer.from_pretrained(str(assets / m))
                   for m in ("tiny-llada", "tiny-dream")})
    unnamed = pair.post("/tokenize", json={"prompt": "add 47+85"})
    named = pair.post("/tokenize", json={"prompt": "add 47+85", "model": "tiny-dream"})
    assert unnamed.status_code == 200 and unnamed.json() == named.json()
    assert pair.get("/tokenizer_info").json()["eos_token"] == "<|endoftext|>"
    chat = {"messages": [{"role": "user", "content": "Hi"}]}    # the two chat templates differ
    r = pair.post("/tokenize", json=chat)
    assert r.status_code == 400 and "chat templates" in r.json()["error"]["message"]
    assert pair.post("/tokenize", json={**chat, "model": "tiny-dream"}).status_code == 200
    from serve_fakes import CharTokenizer
    mixed = app_of({"a": CharTokenizer(), "b": CharTokenizer()})
    r = mixed.get("/tokenizer_info")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert mixed.get("/tokenizer_info", params={"model": "b"}).status_code == 200
