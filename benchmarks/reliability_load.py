"""The load side of `benchmarks/reliability.py`: one request, many clients, outcomes tallied,
and the server under test started on a free port.

Clients use aiohttp (a Ray dependency, so always installed beside Serve): with 200 concurrent
streams in one process, httpx's connection pool made the load generator itself the slowest part
(refusal p50 3.7 s at the client against 0.2 s with aiohttp, same server, same run), which hid
what the server does. The generator's own event-loop lag is measured too, so a slow figure can be
told apart from a slow client.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp
import httpx
import yaml

from dfastllm_ray.serve.ports import free_port  # noqa: F401  (re-exported to reliability.py)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Reverse the string: abcdef"
LAG_TICK_S = 0.05            # the loop-lag monitor sleeps this long and records the overshoot


@dataclass
class Tally:
    """Outcomes of one load phase."""
    completed: int = 0
    tokens: int = 0
    lost: int = 0
    hung: int = 0
    refused: int = 0
    refused_no_retry_after: int = 0
    bad_request: int = 0
    error_event: int = 0       # a stream ended by a clear in-band error event and [DONE]
    status_500: int = 0
    refusal_s: list[float] = field(default_factory=list)
    refusal_at: list[float] = field(default_factory=list)  # when each refusal came (time.time())
    latency_s: list[float] = field(default_factory=list)   # completed requests
    loop_lag_s: list[float] = field(default_factory=list)  # the load generator's own lag

    def add(self, other: "Tally") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def p99(xs: list[float]) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def p50(xs: list[float]) -> Optional[float]:
    return sorted(xs)[len(xs) // 2] if xs else None


def session(url: str, connections: int) -> aiohttp.ClientSession:
    """One connection pool for a phase's clients; deadlines are `one`'s `hang_s`."""
    return aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=None),
                                 connector=aiohttp.TCPConnector(limit=connections))


@dataclass
class Reply:
    status: int
    retry_after: Optional[str]
    text: str


# ---- one request ------------------------------------------------------------------------------
async def one(c: aiohttp.ClientSession, model: str, tally: Tally, hang_s: float, stream: bool,
              extra: Optional[dict] = None) -> float:
    """Send one request; returns how long to sleep before the next (Retry-After on refusal)."""
    body = {"model": model, "prompt": PROMPT, "stream": stream, **(extra or {})}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(hang_s):
            async with c.post("/v1/completions", json=body) as r:
                reply = Reply(r.status, r.headers.get("retry-after"), (await r.read()).decode())
    except TimeoutError:
        tally.hung += 1
        return 0.0
    except aiohttp.ClientError:
        tally.lost += 1
        return 0.5
    return _classify(reply, stream, time.perf_counter() - t0, tally)


def _classify(r: Reply, stream: bool, elapsed: float, tally: Tally) -> float:
    if r.status in (429, 503):
        tally.refused += 1
        tally.refusal_s.append(elapsed)
        tally.refusal_at.append(time.time())
        if not r.retry_after:
            tally.refused_no_retry_after += 1
        return float(r.retry_after or 1)
    if r.status == 400:
        tally.bad_request += 1
        return 0.0
    if r.status != 200:                     # a 5xx other than 503, or any other status
        tally.status_500 += r.status == 500
        tally.lost += 1
        return 0.5
    if stream:
        lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        if not lines or lines[-1] != "[DONE]":
            tally.lost += 1
            return 0.0
        if any(ln.startswith('{"error"') for ln in lines):
            tally.error_event += 1
            return 0.0
        usage = json.loads(lines[-2]).get("usage") or {}
        tally.tokens += usage.get("completion_tokens", 0)
    else:
        tally.tokens += json.loads(r.text)["usage"]["completion_tokens"]
    tally.completed += 1
    tally.latency_s.append(elapsed)
    return 0.0


# ---- many clients -----------------------------------------------------------------------------
async def load(url: str, model: str, clients: int, seconds: float, hang_s: float,
               stream: bool = True, extra: Optional[dict] = None) -> Tally:
    tally = Tally()
    end = time.monotonic() + seconds

    async def client(c: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            wait = await one(c, model, tally, hang_s, stream, extra)
            if wait:
                await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))

    async def lag() -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            tally.loop_lag_s.append(time.perf_counter() - t - LAG_TICK_S)

    async with session(url, clients + 16) as c:
        await asyncio.gather(lag(), *(client(c) for _ in range(clients)))
    return tally


def _load_in_process(args: tuple, out: Any, ready: Any) -> None:
    """A child's share of the load, started when every child is up (the imports of a spawned
    process take a core for ~0.5 s: started at once, the first children's requests were timed
    while the later ones were still starting)."""
    ready.wait()
    out.put(asyncio.run(load(*args)))


async def load_with_probe(url: str, model: str, clients: int, seconds: float, hang_s: float,
                          procs: int = 4) -> tuple[Tally, Tally, float]:
    """The load spread over `procs` child processes (as a real load test would: 200 aiohttp
    streams in one Python process made its event loop part of every figure), and a light
    client here sending one request every 100 ms: its refusals show what a refusal costs when
    the client itself is not the one overloaded. Returns (load, probe, the load's start as
    time.time())."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    shares = [n for n in (clients // procs + (i < clients % procs) for i in range(procs)) if n]
    ready = ctx.Barrier(len(shares) + 1)
    children = [ctx.Process(target=_load_in_process,
                            args=((url, model, n, seconds, hang_s), out, ready))
                for n in shares]
    for child in children:
        child.start()
    await asyncio.to_thread(ready.wait)             # every child imported: all start now
    start, probe = time.time(), Tally()
    end = time.monotonic() + seconds
    async with session(url, 4) as c:
        await asyncio.sleep(min(3.0, seconds / 4))          # let the load fill the model
        while time.monotonic() < end:
            await one(c, model, probe, hang_s, stream=True)
            await asyncio.sleep(0.1)
    tally = Tally()
    for _ in children:
        tally.add(await asyncio.to_thread(out.get))
    for child in children:
        child.join()
    return tally, probe, start


# ---- the server -------------------------------------------------------------------------------
def start_server(config: Path, port: int, direct: bool, model: Optional[str] = None,
                 only_model: bool = False) -> tuple[subprocess.Popen, str, str, str]:
    """The config's first application, every model as configured (with `only_model`: `model`
    alone); returns (process, url, the load's model: `model` or the first, log path)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    models = app["args"]["models"]
    keep = [m for m in models if m["model_id"] == (model or models[0]["model_id"])]
    if not keep:
        raise SystemExit(f"--model {model!r} is not in {config}: {[m['model_id'] for m in models]}")
    if only_model:
        app["args"]["models"] = keep
    if direct:
        for m in app["args"]["models"]:
            m.setdefault("batcher", {})["bypass"] = True
    path = Path(tempfile.mkdtemp()) / "reliability.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Ray's worker niceness as the environment has it (unset: nice 15, as under the README's
    # `serve run`; the serving processes move themselves to DFASTLLM_NICENESS, serve/priority.py)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(path.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "dfastllm_ray.serve", "run", str(path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(proc, url, log.name)
    return proc, url, keep[0]["model_id"], log.name


def _wait_ready(proc: subprocess.Popen, url: str, log: str) -> None:
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early; see {log}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)      # never leave a half-started server behind
            proc.wait(120)
            raise SystemExit(f"the server never became ready; see {log}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the launcher drains, then stops Ray); SIGKILL
    after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def stats(url: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/engine/stats", timeout=10).json()["models"][model]
