"""`benchmarks/serving.py` against a tiny fake OpenAI-compatible server with known latencies.

The fake server (Starlette + uvicorn on a thread) answers request number i after a delay chosen
by the test, so the benchmark's time to first chunk and latency percentiles can be checked
against numbers computed by hand.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
starlette = pytest.importorskip("starlette")
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serving_bench", ROOT / "benchmarks" / "serving.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up here
_spec.loader.exec_module(bench)

MODEL = "fake-dllm"
# Timing checks are lower bounds only (a sleep of d takes at least d); an upper bound would be a
# wall-clock assertion that flakes on a loaded box. Overlap is checked by the server's own count.
TICK_S = 0.005  # timer granularity allowed below a sleep


class FakeServer:
    """OpenAI-shaped completions/chat; request i waits first_delays[i % len] before its first chunk."""

    def __init__(self) -> None:
        self.reset()
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/completions", self.complete, methods=["POST"]),
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
        ])

    def reset(self, first_delays=(0.0,), chunk_delay=0.0, chunks=3, fail_every=0,
              stream_error_on=None, usage=True) -> None:
        self.first_delays, self.chunk_delay, self.chunks = list(first_delays), chunk_delay, chunks
        self.fail_every, self.stream_error_on, self.usage = fail_every, stream_error_on, usage
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = self.peak_in_flight = 0

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def _enter(self) -> None:
        """Count a request open at the server (a stream stays open until its last chunk)."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    async def complete(self, request: Request):
        body = await request.json()
        i = len(self.bodies)
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        if self.fail_every and (i + 1) % self.fail_every == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        chat = "messages" in body
        delay = self.first_delays[i % len(self.first_delays)]
        if body.get("stream"):
            return StreamingResponse(self.sse(body, chat, delay, i), media_type="text/event-stream")
        self._enter()
        await asyncio.sleep(delay + self.chunk_delay * (self.chunks - 1))
        self.in_flight -= 1
        text = "tok " * 2 * self.chunks
        choice = {"index": 0, "finish_reason": "length",
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        out = {"id": f"r{i}", "object": "completion", "model": MODEL, "choices": [choice]}
        if self.usage:
            out["usage"] = {"prompt_tokens": 5, "completion_tokens": 2 * self.chunks,
                            "total_tokens": 5 + 2 * self.chunks}
        return JSONResponse(out)

    async def sse(self, body: dict, chat: bool, delay: float, i: int):
        self._enter()
        try:
            async for event in self._events(body, chat, delay, i):
                yield event
        finally:
            self.in_flight -= 1

    async def _events(self, body: dict, chat: bool, delay: float, i: int):
        await asyncio.sleep(delay)
        for k in range(self.chunks):
            if k:
                await asyncio.sleep(self.chunk_delay)
            if self.stream_error_on == i and k == 1:
                yield f"data: {json.dumps({'error': {'message': 'engine died'}})}\n\n"
                break
            piece = "tok tok "  # one block = two tokens
            choice = {"index": 0, **({"delta": {"content": piece}} if chat else {"text": piece})}
            yield f"data: {json.dumps({'id': f'r{i}', 'choices': [choice]})}\n\n"
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": 2 * self.chunks,
                     "total_tokens": 5 + 2 * self.chunks}
            yield f"data: {json.dumps({'id': f'r{i}', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def fake():
    server_state = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(server_state.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "fake server did not start"
    server_state.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield server_state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def run(fake: FakeServer, **kw):
    cfg = bench.BenchConfig(base_url=fake.url, model=kw.pop("model", MODEL), progress=False, **kw)
    results, wall = asyncio.run(bench.run_benchmark(cfg))
    return results, wall, bench.summarize(results, wall)


def at_least(measured: float, expected: float) -> bool:
    return measured >= expected - TICK_S


# ---------------------------------------------------------------- statistics, no server


def test_percentile_is_linear_interpolation():
    xs = [float(v) for v in range(1, 101)]  # 1..100
    assert bench.percentile(xs, 50) == pytest.approx(50.5)
    assert bench.percentile(xs, 95) == pytest.approx(95.05)
    assert bench.percentile(xs, 99) == pytest.approx(99.01)
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0  # sorts first
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([], 50) is None


def test_summarize_known_records():
    ok = [bench.RequestResult(True, latency_s=0.1 * k, ttfc_s=0.01 * k, output_tokens=10,
                              output_tokens_from_usage=True, chunks=2, status=200)
          for k in range(1, 11)]
    bad = [bench.RequestResult(False, 5.0, status=500, error="boom"),
           bench.RequestResult(False, 9.0, error="ConnectError"),
           bench.RequestResult(False, 1.0, status=200, error="engine died")]
    s = bench.summarize(ok + bad, wall_s=2.0)
    assert (s["num_requests"], s["completed"], s["errors"]) == (13, 10, 3)
    assert s["errors_by_status"] == {"500": 1, "transport": 1, "stream_error": 1}
    assert s["requests_per_s"] == pytest.approx(5.0)
    assert s["output_tokens"] == 100 and s["output_tokens_per_s"] == pytest.approx(50.0)
    assert s["output_tokens_source"] == "usage"
    # failed requests are not timed: latencies are 0.1..1.0 only
    assert s["latency_s"]["p50"] == pytest.approx(0.55)
    assert s["latency_s"]["p95"] == pytest.approx(0.955)
    assert s["latency_s"]["p99"] == pytest.approx(0.991)
    assert s["latency_s"]["mean"] == pytest.approx(0.55)
    assert s["ttfc_s"]["p50"] == pytest.approx(0.055)
    assert s["mean_chunks_per_request"] == 2


def test_build_request_shapes():
    cfg = bench.BenchConfig(base_url="http://x/v1", model="m", output_len=7, chat=True,
                            extra_body={"steps": 7, "block_length": 7})
    path, body = bench.build_request(cfg, "hi")
    assert path == "/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 7 and body["steps"] == 7 and body["block_length"] == 7
    assert body["stream_options"] == {"include_usage": True}
    cfg.stream_usage = False
    assert "stream_options" not in bench.build_request(cfg, "hi")[1]
    cfg.chat, cfg.stream, cfg.stream_usage = False, False, True
    path, body = bench.build_request(cfg, "hi")
    assert path == "/completions" and body["prompt"] == "hi" and "stream_options" not in body
    prompts = bench.make_prompts(4, 16, seed=1)
    assert len(set(prompts)) == 4 and all(len(p.split()) == 16 for p in prompts)
    assert prompts == bench.make_prompts(4, 16, seed=1)


# ---------------------------------------------------------------- against the fake server


def test_stream_known_latencies(fake):
    first = [0.02 * k for k in range(1, 11)]  # 20..200 ms to the first block
    fake.reset(first_delays=first, chunk_delay=0.03, chunks=3)
    results, wall, s = run(fake, num_requests=10, concurrency=1, stream=True)
    assert s["completed"] == 10 and s["errors"] == 0
    total = [d + 2 * 0.03 for d in first]
    for q in (50, 95, 99):
        assert at_least(s["ttfc_s"][f"p{q}"], bench.percentile(first, q)), (q, s["ttfc_s"])
        assert at_least(s["latency_s"][f"p{q}"], bench.percentile(total, q)), (q, s["latency_s"])
    assert s["ttfc_s"]["p50"] <= s["ttfc_s"]["p95"] <= s["ttfc_s"]["p99"]
    # each request: first chunk after its own delay, the two later chunks 2 x 30 ms after it
    for r, d in zip(results, first):
        assert at_least(r.ttfc_s, d) and at_least(r.latency_s, r.ttfc_s + 2 * 0.03), r
    assert [r.chunks for r in results] == [3] * 10
    assert s["output_tokens"] == 60 and s["output_tokens_source"] == "usage"
    # concurrency 1: wall time is the sum of the latencies
    assert at_least(wall, sum(total))
    assert s["requests_per_s"] == pytest.approx(10 / wall)
    assert s["output_tokens_per_s"] == pytest.approx(60 / wall)


def test_concurrency_overlaps_requests(fake):
    fake.reset(first_delays=[0.2], chunk_delay=0.0, chunks=1)
    _, wall, s = run(fake, num_requests=8, concurrency=8, stream=True)
    assert s["completed"] == 8
    # all 8 were open at the server at once (counted there, not inferred from wall time)
    assert fake.peak_in_flight == 8, fake.peak_in_flight
    assert at_least(s["latency_s"]["p50"], 0.2) and at_least(wall, 0.2)


def test_unary_chat_auth_and_extra_body(fake):
    fake.reset(first_delays=[0.05], chunk_delay=0.05, chunks=2)
    results, _, s = run(fake, num_requests=4, concurrency=2, stream=False, chat=True,
                        api_key="sk-test", extra_body={"steps": 16, "threshold": 0.9})
    assert s["completed"] == 4
    assert all(b["messages"][0]["role"] == "user" and b["steps"] == 16 and b["threshold"] == 0.9
               and b["stream"] is False for b in fake.bodies)
    assert fake.auth == ["Bearer sk-test"] * 4
    assert all(r.ttfc_s is None and r.output_tokens == 4 for r in results)
    assert s["ttfc_s"]["p50"] is None
    assert at_least(s["latency_s"]["p50"], 0.1)


def test_errors_are_counted_not_timed(fake):
    fake.reset(first_delays=[0.0], fail_every=3, stream_error_on=0, chunks=3)
    results, _, s = run(fake, num_requests=9, concurrency=1, stream=True)
    # requests 3, 6, 9 get HTTP 500; request 1 gets an error event mid-stream
    assert s["errors"] == 4 and s["completed"] == 5
    assert s["errors_by_status"] == {"500": 3, "stream_error": 1}
    assert "engine died" in results[0].error


def test_transport_error_when_server_is_absent():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cfg = bench.BenchConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL,
                            num_requests=2, concurrency=1, progress=False, timeout_s=5)
    results, wall = asyncio.run(bench.run_benchmark(cfg))
    s = bench.summarize(results, wall)
    assert s["errors"] == 2 and s["errors_by_status"] == {"transport": 2}
    assert s["latency_s"]["p50"] is None and s["requests_per_s"] == 0


def test_words_estimated_without_usage(fake):
    fake.reset(first_delays=[0.0], chunks=3, usage=False)
    _, _, s = run(fake, num_requests=2, concurrency=2, stream=True)
    assert s["output_tokens"] == 12 and s["output_tokens_source"] == "estimated"


def test_cli_prints_and_writes_json(fake, tmp_path, capsys):
    fake.reset(first_delays=[0.01], chunks=2)
    out = tmp_path / "res" / "serving.json"
    summary = bench.main(["--base-url", fake.url, "--num-requests", "6", "--concurrency", "3",
                          "--prompt-len", "12", "--output-len", "8", "--no-progress",
                          "--extra-body", '{"block_length": 4}', "--warmup", "2",
                          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "req/s" in printed and "time to first chunk ms" in printed and "latency ms" in printed
    data = json.loads(out.read_text())
    assert data["summary"] == json.loads(json.dumps(summary))
    assert data["config"]["model"] == MODEL  # found through GET /models
    assert "api_key" not in data["config"] and len(data["requests"]) == 6
    assert summary["num_requests"] == 6 and len(fake.bodies) == 8  # 2 warmup requests untimed
    assert data["meta"]["started_at"]
    assert all(len(b["prompt"].split()) == 12 and b["max_tokens"] == 8 and b["block_length"] == 4
               for b in fake.bodies)


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--concurrency", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--extra-body", "[1, 2]"])
