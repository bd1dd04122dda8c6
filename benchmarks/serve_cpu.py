"""What each hop of the Serve graph costs in CPU: seconds of CPU per completed request, by process.

Starts `python -m dfastllm_ray.serve run CONFIG` (the launcher, as `benchmarks/reliability.py`
does), warms it up, then runs `--clients` streaming clients for `--duration` s and reads every
Ray process's CPU time (user + system, from /proc: Linux only) before and after. The full graph
(the batcher admitting, replica -> ingress streams) and `--direct` (`batcher.bypass`: no
admission by the batcher) alternate for `--rounds` rounds in one sitting, so the two are
compared side by side on a noisy machine.

    python benchmarks/serve_cpu.py                       # 3 rounds x (graph, direct), 30 s each

CPU per request says where the time goes, which tokens/s alone cannot: on 2 cores every serving
process competes with the engine, so what a hop costs shows as CPU the engine did not get.
Roles: proxy (Serve's HTTP proxy, the gate inside it), ingress, batcher, replica (the engine),
ray (controller, agents, idle workers), client (this process's load generator).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.reliability_load import free_port, load, start_server, stop_server  # noqa: E402

ROLES = ("proxy", "ingress", "batcher", "replica", "ray", "client")
_MARKS = (("ProxyActor", "proxy"), ("OpenAIIngress", "ingress"), ("Batcher-", "batcher"),
          ("ModelReplica-", "replica"))


def role(title: str) -> str:
    """The role of a Ray process from its title (`ray::ServeReplica:app:Batcher-m`, ...)."""
    return next((r for mark, r in _MARKS if mark in title), "ray")


def ray_processes() -> dict[int, str]:
    """pid -> title of every process whose title starts with `ray::` (Ray's workers)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if args.startswith("ray::"):
            procs[int(pid)] = args.split()[0]
    return procs


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` so far (0 once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text.rsplit(")", 1)[1].split()     # after the title, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def by_role(before: dict[int, float], after: dict[int, float],
            titles: dict[int, str]) -> dict[str, float]:
    """CPU seconds spent between two readings, summed per role."""
    spent = dict.fromkeys(ROLES, 0.0)
    for pid, title in titles.items():
        spent[role(title)] += max(0.0, after.get(pid, 0.0) - before.get(pid, 0.0))
    return spent


async def one_run(config: Path, direct: bool, clients: int, seconds: float,
                  warmup_s: float) -> dict:
    proc, url, model, log = start_server(config, free_port(), direct)
    try:
        await load(url, model, min(8, clients), warmup_s, 120.0)
        titles = ray_processes()
        before = {p: cpu_seconds(p) for p in titles}
        client0, t0 = time.process_time(), time.perf_counter()
        tally = await load(url, model, clients, seconds, 120.0)
        wall = time.perf_counter() - t0
        spent = by_role(before, {p: cpu_seconds(p) for p in titles}, titles)
        spent["client"] = time.process_time() - client0
    finally:
        stop_server(proc)
    return {"direct": direct, "wall": wall, "completed": tally.completed,
            "tok_s": tally.tokens / wall, "lost": tally.lost + tally.hung, "cpu": spent}


def row(r: dict, round_: int) -> str:
    n = max(1, r["completed"])
    per = " | ".join(f"{1000 * r['cpu'][k] / n:.1f}" for k in ROLES)
    serving = sum(r["cpu"][k] for k in ROLES if k != "client")
    share = 100 * r["cpu"]["batcher"] / serving if serving else 0.0
    graph = "direct" if r["direct"] else "graph"
    return (f"| {graph} | {round_} | {r['completed']} | {r['lost']} | {r['tok_s']:.1f} | {per} | "
            f"{1000 * serving / n:.1f} | {share:.1f} % |")


def print_report(runs: list[tuple[int, dict]]) -> None:
    print("| graph | round | completed | lost | tok/s | "
          + " | ".join(f"{k} ms/req" for k in ROLES) + " | serving ms/req | batcher share |")
    print("| " + " | ".join(["---"] * (len(ROLES) + 7)) + " |")
    for i, r in runs:
        print(row(r, i))
    mean = {d: [r["tok_s"] for _, r in runs if r["direct"] == d] for d in (False, True)}
    if mean[False] and mean[True]:
        g, d = (sum(v) / len(v) for v in (mean[False], mean[True]))
        print(f"mean tok/s: graph {g:.1f}, direct {d:.1f} (direct / graph {d / g:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of untimed load first")
    ap.add_argument("--rounds", type=int, default=3, help="(graph, direct) pairs, alternated")
    args = ap.parse_args()
    if not Path("/proc/self/stat").exists():
        raise SystemExit("serve_cpu.py reads CPU times from /proc: it runs on Linux only")
    runs = []
    for i in range(1, args.rounds + 1):
        for direct in (False, True):
            r = asyncio.run(one_run(Path(args.config), direct, args.clients, args.duration,
                                    args.warmup))
            print(f"round {i}/{args.rounds} {'direct' if direct else 'graph'}: "
                  f"{r['completed']} completed, {r['tok_s']:.1f} tok/s", flush=True)
            runs.append((i, r))
    print(f"serve_cpu: {Path(args.config).name}, {args.clients} streaming clients, "
          f"{args.duration:g} s per run, {os.cpu_count()} CPUs")
    print_report(runs)


if __name__ == "__main__":
    main()
