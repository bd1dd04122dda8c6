"""Reliability figures of the served API, printed as one table (issue 10's checks).

Starts `python -m dfastllm_ray.serve run CONFIG` (the draining launcher) on a free port, then:

1. goodput: `--low` and `--high` concurrent streaming clients for `--duration` s each. Clients
   honour Retry-After. Reported: completed requests and tokens/s, lost (transport error,
   a 5xx other than a 503, a stream without [DONE]), hung (no answer within `--hang-s`),
   refusals (429/503), refusals without Retry-After, refusal latency p99, and the tokens/s
   ratio high / low;
2. bounds: `--bound-clients` clients, first alone, then beside a stream of requests with knobs
   past their bounds (steps, max_tokens, n, stop, seed, prompt length): 400s received, and the
   other requests' p99 latency with and without them (alternated `--bounds-rounds` times);
3. replica kill: SIGKILL to the model replica's process under load: 500s, readiness 503 latency,
   refusals without Retry-After, time until served again (no app restart);
4. SIGTERM drain: admitted requests (streams and unary) finished / cut with an error event /
   lost, new requests admitted after the signal, exit code and seconds to exit.

    python benchmarks/reliability.py --duration 60            # the issue's scale
    python benchmarks/reliability.py --duration 10 --high 64   # a short run

The client runs on the same machine as the server (it competes for the same cores); the
overload phase's clients are spread over `--client-procs` processes, and the generator's own
event-loop lag is reported beside each load phase. The clients, the tally and the server start
are in `benchmarks/reliability_load.py`; the phases and the table are here.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.reliability_load import (PROMPT, Tally, free_port, load,  # noqa: E402
                                         load_with_probe, one, p50, p99, session, start_server,
                                         stats, stop_server)


# ---- phases -----------------------------------------------------------------------------------
BAD_KNOBS = [{"steps": 10**9}, {"max_tokens": 10**6}, {"n": 10**4}, {"stop": ["x"] * 1000},
             {"seed": 2**64}, {"prompt": "x" * 400_000}, {"steps": 33, "max_tokens": 32}]


CHEAP_400 = [{"max_tokens": 0}]     # the control: a 400 as cheap as a request can be


async def bounds(url: str, model: str, clients: int, seconds: float, hang_s: float,
                 rounds: int = 1, control: bool = False) -> dict:
    """Other requests' p99 latency alone, then beside a stream of out-of-bound requests (and,
    with `control`, beside the same rate of cheap 400s: what any extra request traffic costs),
    alternately `rounds` times (alone, beside, ...: the order's drift shows)."""
    bad, cheap = Tally(), Tally()
    rows: list[tuple[Tally, ...]] = []
    for _ in range(rounds):
        row = [await load(url, model, clients, seconds, hang_s, stream=False)]
        for knobs, tally in ((BAD_KNOBS, bad), (CHEAP_400, cheap))[:2 if control else 1]:
            stop = asyncio.Event()
            task = asyncio.create_task(attack(url, model, tally, stop, hang_s, knobs))
            row.append(await load(url, model, clients, seconds, hang_s, stream=False))
            stop.set()
            await task
        rows.append(tuple(row))
    return {"pairs": rows, "bad": bad, "cheap": cheap}


async def attack(url: str, model: str, bad: Tally, stop: asyncio.Event, hang_s: float,
                 knob_list: list[dict] = BAD_KNOBS) -> None:
    """Requests with `knob_list`'s knobs, one every ~20 ms, until `stop`: each must be a 400."""
    async with session(url, 4) as c:
        i = 0
        while not stop.is_set():
            knobs = dict(knob_list[i % len(knob_list)])
            body = {"model": model, "prompt": knobs.pop("prompt", PROMPT), **knobs}
            async with asyncio.timeout(hang_s), c.post("/v1/completions", json=body) as r:
                await r.read()
            bad.bad_request += r.status == 400
            bad.lost += r.status != 400
            i += 1
            await asyncio.sleep(0.02)


def bounds_rows(b: dict) -> list[tuple[str, str]]:
    rows = b["pairs"]
    lost = sum(t.lost for row in rows for t in row[1:])
    hung = sum(t.hung for row in rows for t in row[1:])
    p99s = ", ".join(" / ".join(ms(p99(t.latency_s)) for t in row) for row in rows)
    label = "alone / beside them" + (" / beside cheap 400s" if len(rows[0]) > 2 else "")
    out = [("bounds: out-of-bound requests -> 400 / other",
            f"{b['bad'].bad_request} / {b['bad'].lost}"),
           (f"bounds: others' p99 {label} (x{len(rows)})", p99s),
           ("bounds: others lost / hung", f"{lost} / {hung}")]
    if len(rows[0]) > 2:
        out.insert(1, ("bounds: cheap 400s (max_tokens 0) -> 400 / other",
                       f"{b['cheap'].bad_request} / {b['cheap'].lost}"))
    return out


async def kill_replica(url: str, model: str, clients: int, hang_s: float) -> dict:
    """SIGKILL the replica process under load; readiness and outcomes until it serves again."""
    victim = stats(url, model)["pid"]
    stop = asyncio.Event()
    tally = Tally()

    async def loader() -> None:
        async with session(url, clients + 4) as c:
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
    async with session(url, 2) as c:
        while time.monotonic() - t_kill < 180:
            code = await ready_code(c)
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


async def ready_code(c) -> Optional[int]:
    """/health/ready's status; None when it does not answer within 5 s."""
    try:
        async with asyncio.timeout(5), c.get("/health/ready") as r:
            return r.status
    except TimeoutError:
        return None


async def drain(proc: subprocess.Popen, url: str, model: str, clients: int,
                hang_s: float) -> dict:
    """SIGTERM under load: what happened to the requests in flight at the signal, and to the
    ones sent after it."""
    inflight, after = Tally(), Tally()
    term: list[float] = []
    admitted_at: list[float] = []     # sent after the signal and admitted: seconds after it
    body = {"max_tokens": 64, "block_length": 8, "steps": 64, "early_exit": False}

    async def client(c, i: int) -> None:
        while proc.poll() is None:
            t_start, mine = time.monotonic(), Tally()
            wait = await one(c, model, mine, hang_s, stream=bool(i % 2), extra=body)
            if term and t_start < term[0]:
                inflight.add(mine)
            elif term:
                after.add(mine)
                if mine.completed:
                    admitted_at.append(t_start - term[0])
            if wait:
                await asyncio.sleep(min(wait, 0.2))

    async with session(url, clients + 4) as c:
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
    return {"inflight": inflight, "after": after, "exit_code": proc.poll(), "exit_s": exit_s,
            "admitted_at": admitted_at}


# ---- the table ----------------------------------------------------------------------------------
def ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


BURST_S = 5.0                 # the clients' first connections: reported apart (where the tail was)


def split_at(t: Tally, when: float) -> tuple[list[float], list[float]]:
    """Refusal latencies of refusals answered before / after `when` (time.time())."""
    pairs = list(zip(t.refusal_at, t.refusal_s))
    return [s for a, s in pairs if a < when], [s for a, s in pairs if a >= when]


def goodput_rows(name: str, t: Tally, seconds: float) -> list[tuple[str, str]]:
    return [(f"{name}: completed req / tok/s",
             f"{t.completed} / {t.tokens / seconds:.1f}"),
            (f"{name}: lost / hung / error events", f"{t.lost} / {t.hung} / {t.error_event}"),
            (f"{name}: refusals (429/503) / without Retry-After",
             f"{t.refused} / {t.refused_no_retry_after}"),
            (f"{name}: refusal latency p50 / p99",
             f"{ms(p50(t.refusal_s))} / {ms(p99(t.refusal_s))}"),
            (f"{name}: completed latency p99", ms(p99(t.latency_s))),
            (f"{name}: load generator's event-loop lag p99", ms(p99(t.loop_lag_s)))]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"| {'figure'.ljust(width)} | value |")
    print(f"| {'-' * width} | ----- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


async def overload_rows(url: str, model: str, args: argparse.Namespace,
                        low: Tally) -> list[tuple[str, str]]:
    d = args.duration
    before = httpx.get(f"{url}/v1/engine/stats", timeout=30).json()["ingress"]["refused"]
    high, probe, start = await load_with_probe(url, model, args.high, d, args.hang_s,
                                               args.client_procs)
    rows = goodput_rows(f"{args.high} clients ({args.client_procs} processes)", high, d)
    rows.append((f"{args.high} clients: refusal latency p99, first {BURST_S:.0f} s / after",
                 " / ".join(ms(p99(xs)) for xs in split_at(high, start + BURST_S))))
    rows.append((f"probe beside {args.high} clients: refusals / p99",
                 f"{probe.refused} / {ms(p99(probe.refusal_s))}"))
    ingress = httpx.get(f"{url}/v1/engine/stats", timeout=30).json()["ingress"]
    by_ingress = ingress["refused"] - before
    rows.append(("refusals answered by the proxy gate / by the ingress",
                 f"{high.refused + probe.refused - by_ingress} / {by_ingress}"))
    # the ingress keeps the times of all its 429/503s (startup readiness included): only
    # meaningful when this phase's refusals reached it
    rows.append(("refusal time inside the ingress p99 (arrival -> response)",
                 "-" if ingress["refusal_ms_p99"] is None or not by_ingress
                 else f"{ingress['refusal_ms_p99']:.1f} ms"))
    ratio = (high.tokens / low.tokens) if low.tokens else float("nan")
    rows.append((f"tok/s {args.high} clients / {args.low} clients", f"{ratio:.2f}"))
    return rows


def kill_rows(kills: list[dict]) -> list[tuple[str, str]]:
    """One row set over `--kills` kills: outcomes summed, times as the worst and each."""
    t = Tally()
    for k in kills:
        t.add(k["tally"])

    def worst(key: str) -> str:
        xs = [k[key] for k in kills]
        if len(xs) == 1 or None in xs:
            return " / ".join(ms(x) for x in xs)
        return f"{ms(max(xs))} worst ({', '.join(ms(x) for x in xs)})"
    return [(f"replica kill x{len(kills)}: 500s / lost / hung",
             f"{t.status_500} / {t.lost} / {t.hung}"),
            (f"replica kill x{len(kills)}: completed / 503s / without Retry-After / error events",
             f"{t.completed} / {t.refused} / {t.refused_no_retry_after} / {t.error_event}"),
            (f"replica kill x{len(kills)}: readiness 503 after", worst("ready_503_s")),
            (f"replica kill x{len(kills)}: ready again after", worst("back_s")),
            (f"replica kill x{len(kills)}: a new replica, same app",
             "yes" if all(k["new_replica"] for k in kills) else "no")]


async def measure(args: argparse.Namespace) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    proc, url, model, log = start_server(Path(args.config), free_port(), args.direct,
                                         args.model, args.only_model)
    try:
        d = args.duration
        low = await load(url, model, args.low, d, args.hang_s)
        rows += goodput_rows(f"{args.low} clients", low, d)
        rows.append((f"{args.low} clients: completed latency p50",
                     ms(p50(low.latency_s))))
        if not args.skip_high:
            rows += await overload_rows(url, model, args, low)
        if not args.skip_bounds:
            b = await bounds(url, model, args.bound_clients, args.bounds_s or d / 2,
                             args.hang_s, args.bounds_rounds, args.bounds_control)
            rows += bounds_rows(b)
        if not args.skip_kill:
            kills = [await kill_replica(url, model, args.bound_clients, args.hang_s)
                     for _ in range(args.kills)]
            rows += kill_rows(kills)
        if not args.skip_drain:
            r = await drain(proc, url, model, args.bound_clients, args.hang_s)
            i, a = r["inflight"], r["after"]
            rows += [("SIGTERM: in flight -> finished / error event / lost",
                      f"{i.completed} / {i.error_event + i.refused} / {i.lost + i.hung}"),
                     ("SIGTERM: sent after -> admitted / refused / unreachable",
                      f"{a.completed} / {a.refused} / {a.lost}"),
                     ("SIGTERM: the last admitted was sent this long after the signal",
                      ms(max(r["admitted_at"], default=None))),
                     ("SIGTERM: exit code / seconds to exit",
                      f"{r['exit_code']} / {r['exit_s']:.1f}")]
    finally:
        stop_server(proc)
    text = Path(log).read_text()
    rows.append(("server log: tracebacks", str(text.count("Traceback"))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--model", default=None, help="the model of the config to serve (default: "
                    "its first)")
    ap.add_argument("--only-model", action="store_true", help="serve --model alone (default: "
                    "every model of the config, as `serve run` would; the load goes to --model)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load phase")
    ap.add_argument("--low", type=int, default=32, help="clients of the reference phase")
    ap.add_argument("--high", type=int, default=200, help="clients of the overload phase")
    ap.add_argument("--client-procs", type=int, default=4,
                    help="processes the overload phase's clients are spread over")
    ap.add_argument("--bound-clients", type=int, default=16)
    ap.add_argument("--bounds-rounds", type=int, default=1,
                    help="alone / beside rounds of the bounds phase, alternated")
    ap.add_argument("--bounds-control", action="store_true",
                    help="each bounds round also runs beside the same rate of cheap 400s")
    ap.add_argument("--bounds-s", type=float, default=None,
                    help="seconds per bounds load (default: half of --duration)")
    ap.add_argument("--hang-s", type=float, default=120.0, help="a request slower is hung")
    ap.add_argument("--direct", action="store_true",
                    help="no admission by the batcher (batcher.bypass), to measure what it costs")
    ap.add_argument("--skip-high", action="store_true")
    ap.add_argument("--skip-bounds", action="store_true")
    ap.add_argument("--kills", type=int, default=1, help="replica kills, one after another")
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--skip-drain", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    rows = asyncio.run(measure(args))
    graph = "direct (no batcher admission)" if args.direct else "admitted by the batcher"
    print(f"reliability: {Path(args.config).name}, {args.duration:g} s per phase, {graph}, "
          f"{os.cpu_count()} CPUs, {time.time() - t0:.0f} s in all")
    print_table(rows)


if __name__ == "__main__":
    main()
