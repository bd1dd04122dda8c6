"""Reliability figures of the served API, printed as one table (issue 10's checks).

Starts `python -m dfastllm_ray.serve run CONFIG` (the draining launcher) on a free port, then:

1. goodput: `--low` and `--high` concurrent streaming clients for `--duration` s each. Clients
   honour Retry-After. Reported: completed requests and tokens/s, lost (transport error,
   a 5xx other than a 503, a stream without [DONE]), hung (no answer within `--hang-s`),
   refusals (429/503), refusals without Retry-After, refusal latency p99, and the tokens/s
   ratio high / low;
2. bounds: `--bound-clients` clients, first alone, then beside a stream of requests with knobs
   past their bounds (steps, max_tokens, n, stop, seed, prompt length): 400s received, and the
   other requests' p99 latency with and without them;
3. replica kill: SIGKILL to the model replica's process under load: 500s, readiness 503 latency,
   refusals without Retry-After, time until served again (no app restart);
4. SIGTERM drain: admitted requests (streams and unary) finished / cut with an error event /
   lost, new requests admitted after the signal, exit code and seconds to exit.

    python benchmarks/reliability.py --duration 60            # the issue's scale
    python benchmarks/reliability.py --duration 10 --high 64   # a short run

The client runs on the same machine as the server (it competes for the same cores).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Reverse the string: abcdef"


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
    latency_s: list[float] = field(default_factory=list)   # completed requests

    def add(self, other: "Tally") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


def p99(xs: list[float]) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one request ------------------------------------------------------------------------------
async def one(c: httpx.AsyncClient, model: str, tally: Tally, hang_s: float, stream: bool,
              extra: Optional[dict] = None) -> float:
    """Send one request; returns how long to sleep before the next (Retry-After on refusal)."""
    body = {"model": model, "prompt": PROMPT, "stream": stream, **(extra or {})}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(hang_s):
            if stream:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    raw = (await r.aread()).decode() if r.status_code == 200 else None
                    if raw is None:
                        await r.aread()
            else:
                r = await c.post("/v1/completions", json=body)
                raw = r.text
    except TimeoutError:
        tally.hung += 1
        return 0.0
    except httpx.HTTPError:
        tally.lost += 1
        return 0.5
    elapsed = time.perf_counter() - t0
    return _classify(r, raw, stream, elapsed, tally)


def _classify(r: httpx.Response, raw: Optional[str], stream: bool, elapsed: float,
              tally: Tally) -> float:
    if r.status_code in (429, 503):
        tally.refused += 1
        tally.refusal_s.append(elapsed)
        ra = r.headers.get("retry-after")
        if not ra:
            tally.refused_no_retry_after += 1
        return float(ra or 1)
    if r.status_code == 400:
        tally.bad_request += 1
        return 0.0
    if r.status_code >= 500:
        tally.status_500 += r.status_code == 500
        tally.lost += 1
        return 0.5
    if stream:
        lines = [ln[6:] for ln in (raw or "").splitlines() if ln.startswith("data: ")]
        if not lines or lines[-1] != "[DONE]":
            tally.lost += 1
            return 0.0
        if any(ln.startswith('{"error"') for ln in lines):
            tally.error_event += 1
            return 0.0
        usage = json.loads(lines[-2]).get("usage") or {}
        tally.tokens += usage.get("completion_tokens", 0)
    else:
        tally.tokens += r.json()["usage"]["completion_tokens"]
    tally.completed += 1
    tally.latency_s.append(elapsed)
    return 0.0


def _load_in_process(args: tuple, out: Any) -> None:
    out.put(asyncio.run(load(*args)))


async def load_with_probe(url: str, model: str, clients: int, seconds: float,
                          hang_s: float) -> tuple[Tally, Tally]:
    """The load in a child process, and a light client here sending one request every 100 ms:
    its refusals show what a refusal costs when the client itself is not the one overloaded."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_load_in_process, args=((url, model, clients, seconds, hang_s),
                                                       out))
    child.start()
    probe = Tally()
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=hang_s) as c:
        await asyncio.sleep(min(3.0, seconds / 4))          # let the load fill the model
        while time.monotonic() < end:
            await one(c, model, probe, hang_s, stream=True)
            await asyncio.sleep(0.1)
    tally = await asyncio.to_thread(out.get)
    child.join()
    return tally, probe


async def load(url: str, model: str, clients: int, seconds: float, hang_s: float,
               stream: bool = True, extra: Optional[dict] = None) -> Tally:
    tally = Tally()
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 16, max_keepalive_connections=clients + 16)

    async def client(c: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            wait = await one(c, model, tally, hang_s, stream, extra)
            if wait:
                await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))

    async with httpx.AsyncClient(base_url=url, timeout=hang_s + 5, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return tally


# ---- the server -------------------------------------------------------------------------------
def start_server(config: Path, port: int, direct: bool,
                 model: Optional[str] = None) -> tuple[subprocess.Popen, str, str, str]:
    """The config's first application, with only `model` (default: its first model)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    models = app["args"]["models"]
    keep = [m for m in models if m["model_id"] == (model or models[0]["model_id"])]
    if not keep:
        raise SystemExit(f"--model {model!r} is not in {config}: {[m['model_id'] for m in models]}")
    app["args"]["models"] = keep
    if direct:
        for m in app["args"]["models"]:
            m.setdefault("batcher", {})["bypass"] = True
    path = Path(tempfile.mkdtemp()) / "reliability.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_worker_niceness": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(path.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "dfastllm_ray.serve", "run", str(path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early; see {log.name}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGTERM)      # never leave a half-started server behind
            proc.wait(120)
            raise SystemExit(f"the server never became ready; see {log.name}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return proc, url, app["args"]["models"][0]["model_id"], log.name


def stats(url: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/engine/stats", timeout=10).json()["models"][model]


# ---- phases -----------------------------------------------------------------------------------
BAD_KNOBS = [{"steps": 10**9}, {"max_tokens": 10**6}, {"n": 10**4}, {"stop": ["x"] * 1000},
             {"seed": 2**64}, {"prompt": "x" * 400_000}, {"steps": 33, "max_tokens": 32}]


async def bounds(url: str, model: str, clients: int, seconds: float, hang_s: float) -> dict:
    """Other requests' p99 latency alone, then beside a stream of out-of-bound requests."""
    alone = await load(url, model, clients, seconds, hang_s, stream=False)
    bad = Tally()
    stop = asyncio.Event()

    async def attacker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=hang_s) as c:
            i = 0
            while not stop.is_set():
                knobs = dict(BAD_KNOBS[i % len(BAD_KNOBS)])
                body = {"model": model, "prompt": knobs.pop("prompt", PROMPT), **knobs}
                r = await c.post("/v1/completions", json=body)
                bad.bad_request += r.status_code == 400
                bad.lost += r.status_code != 400
                i += 1
                await asyncio.sleep(0.02)

    task = asyncio.create_task(attacker())
    beside = await load(url, model, clients, seconds, hang_s, stream=False)
    stop.set()
    await task
    return {"alone": alone, "beside": beside, "bad": bad}


async def kill_replica(url: str, model: str, clients: int, hang_s: float) -> dict:
    """SIGKILL the replica process under load; readiness and outcomes until it serves again."""
    victim = stats(url, model)["pid"]
    stop = asyncio.Event()
    tally = Tally()

    async def loader() -> None:
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(base_url=url, timeout=hang_s + 5, limits=limits) as c:
            async def client(i: int) -> None:
                while not stop.is_set():
                    wait = await one(c, model, tally, hang_s, stream=bool(i % 2))
                    if wait:
                        await asyncio.sleep(wait)
            await asyncio.gather(*(client(i) for i in range(clients)))

    task = asyncio.create_task(loader())
    await asyncio.sleep(3.0)
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    t_503 = t_back = None
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while time.monotonic() - t_kill < 180:
            code = (await c.get("/health/ready")).status_code
            if code == 503 and t_503 is None:
                t_503 = time.monotonic() - t_kill
            if code == 200 and t_503 is not None:
                t_back = time.monotonic() - t_kill
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(3.0)                     # served again: traffic after the recovery
    stop.set()
    await task
    new = stats(url, model)["pid"]
    return {"tally": tally, "ready_503_s": t_503, "back_s": t_back, "new_replica": new != victim}


async def drain(proc: subprocess.Popen, url: str, model: str, clients: int,
                hang_s: float) -> dict:
    """SIGTERM under load: what happened to the requests in flight at the signal, and to the
    ones sent after it."""
    inflight, after = Tally(), Tally()
    term: list[float] = []
    body = {"max_tokens": 64, "block_length": 8, "steps": 64, "early_exit": False}

    async def client(c: httpx.AsyncClient, i: int) -> None:
        while proc.poll() is None:
            t_start, mine = time.monotonic(), Tally()
            wait = await one(c, model, mine, hang_s, stream=bool(i % 2), extra=body)
            if term and t_start < term[0]:
                inflight.add(mine)
            elif term:
                after.add(mine)
            if wait:
                await asyncio.sleep(min(wait, 0.2))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=hang_s + 5, limits=limits) as c:
        tasks = [asyncio.create_task(client(c, i)) for i in range(clients)]
        await asyncio.sleep(4.0)
        t0 = time.monotonic()
        term.append(t0)
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.1)
        exit_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"inflight": inflight, "after": after, "exit_code": proc.poll(), "exit_s": exit_s}


# ---- the table ----------------------------------------------------------------------------------
def ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def goodput_rows(name: str, t: Tally, seconds: float) -> list[tuple[str, str]]:
    return [(f"{name}: completed req / tok/s",
             f"{t.completed} / {t.tokens / seconds:.1f}"),
            (f"{name}: lost / hung / error events", f"{t.lost} / {t.hung} / {t.error_event}"),
            (f"{name}: refusals (429/503) / without Retry-After",
             f"{t.refused} / {t.refused_no_retry_after}"),
            (f"{name}: refusal latency p50 / p99",
             f"{ms(sorted(t.refusal_s)[len(t.refusal_s) // 2] if t.refusal_s else None)} / "
             f"{ms(p99(t.refusal_s))}"),
            (f"{name}: completed latency p99", ms(p99(t.latency_s)))]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"| {'figure'.ljust(width)} | value |")
    print(f"| {'-' * width} | ----- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


async def overload_rows(url: str, model: str, args: argparse.Namespace,
                        low: Tally) -> list[tuple[str, str]]:
    d = args.duration
    high, probe = await load_with_probe(url, model, args.high, d, args.hang_s)
    rows = goodput_rows(f"{args.high} clients", high, d)
    rows.append((f"probe beside {args.high} clients: refusals / p99",
                 f"{probe.refused} / {ms(p99(probe.refusal_s))}"))
    ingress = httpx.get(f"{url}/v1/engine/stats", timeout=30).json()["ingress"]
    rows.append(("refusal time inside the ingress p99 (arrival -> response)",
                 "-" if ingress["refusal_ms_p99"] is None
                 else f"{ingress['refusal_ms_p99']:.1f} ms"))
    ratio = (high.tokens / low.tokens) if low.tokens else float("nan")
    rows.append((f"tok/s {args.high} clients / {args.low} clients", f"{ratio:.2f}"))
    return rows


async def measure(args: argparse.Namespace) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    proc, url, model, log = start_server(Path(args.config), free_port(), args.direct,
                                         args.model)
    try:
        d = args.duration
        low = await load(url, model, args.low, d, args.hang_s)
        rows += goodput_rows(f"{args.low} clients", low, d)
        rows.append((f"{args.low} clients: completed latency p50",
                     ms(sorted(low.latency_s)[len(low.latency_s) // 2] if low.latency_s
                        else None)))
        if not args.skip_high:
            rows += await overload_rows(url, model, args, low)
        if not args.skip_bounds:
            b = await bounds(url, model, args.bound_clients, d / 2, args.hang_s)
            rows += [("bounds: out-of-bound requests -> 400 / other",
                      f"{b['bad'].bad_request} / {b['bad'].lost}"),
                     ("bounds: others' p99 alone / beside them",
                      f"{ms(p99(b['alone'].latency_s))} / {ms(p99(b['beside'].latency_s))}"),
                     ("bounds: others lost / hung", f"{b['beside'].lost} / {b['beside'].hung}")]
        if not args.skip_kill:
            k = await kill_replica(url, model, args.bound_clients, args.hang_s)
            t = k["tally"]
            rows += [("replica kill: 500s / lost / hung", f"{t.status_500} / {t.lost} / {t.hung}"),
                     ("replica kill: completed / 503s / without Retry-After / error events",
                      f"{t.completed} / {t.refused} / {t.refused_no_retry_after} / "
                      f"{t.error_event}"),
                     ("replica kill: readiness 503 after", ms(k["ready_503_s"])),
                     ("replica kill: ready again after (new replica, same app)",
                      f"{ms(k['back_s'])} ({'yes' if k['new_replica'] else 'no'})")]
        if not args.skip_drain:
            r = await drain(proc, url, model, args.bound_clients, args.hang_s)
            i, a = r["inflight"], r["after"]
            rows += [("SIGTERM: in flight -> finished / error event / lost",
                      f"{i.completed} / {i.error_event + i.refused} / {i.lost + i.hung}"),
                     ("SIGTERM: sent after -> admitted / refused / unreachable",
                      f"{a.completed} / {a.refused} / {a.lost}"),
                     ("SIGTERM: exit code / seconds to exit",
                      f"{r['exit_code']} / {r['exit_s']:.1f}")]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    text = Path(log).read_text()
    rows.append(("server log: tracebacks", str(text.count("Traceback"))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--model", default=None, help="the model of the config to serve (default: "
                    "its first)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load phase")
    ap.add_argument("--low", type=int, default=32, help="clients of the reference phase")
    ap.add_argument("--high", type=int, default=200, help="clients of the overload phase")
    ap.add_argument("--bound-clients", type=int, default=16)
    ap.add_argument("--hang-s", type=float, default=120.0, help="a request slower is hung")
    ap.add_argument("--direct", action="store_true",
                    help="ingress -> replicas directly (batcher.bypass), to measure its hop")
    ap.add_argument("--skip-high", action="store_true")
    ap.add_argument("--skip-bounds", action="store_true")
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--skip-drain", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    rows = asyncio.run(measure(args))
    print(f"reliability: {Path(args.config).name}, {args.duration:g} s per phase, "
          f"{'direct (no batcher hop)' if args.direct else 'ingress -> batcher -> replica'}, "
          f"{os.cpu_count()} CPUs, {time.time() - t0:.0f} s in all")
    print_table(rows)


if __name__ == "__main__":
    main()
