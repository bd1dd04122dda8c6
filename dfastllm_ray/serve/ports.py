"""A free TCP port for a server started by a test or a benchmark.

Binding port 0 returns a port from the kernel's ephemeral range, and that port is free only
until the socket closes: Ray's own processes (GCS, raylet, every worker's gRPC server) bind
port 0 while a cluster starts, so one of them could take it before Serve's proxy binds it
(seen: "Failed to bind to address '0.0.0.0:33829'", the proxy restarted, the run lost). A port
picked below the ephemeral range and above Ray's worker ports is never handed out that way.
"""
from __future__ import annotations

import random
import socket

RAY_WORKER_PORTS_END = 19999     # Ray's default max_worker_port
DEFAULT_EPHEMERAL_START = 32768  # Linux's default ip_local_port_range start


def ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port that binds now on `host` (and 0.0.0.0), outside the ephemeral range where it can;
    a kernel-chosen one when that range leaves no room."""
    lo, hi = RAY_WORKER_PORTS_END + 1, ephemeral_start() - 1
    for _ in range(tries if hi > lo else 0):
        port = random.randint(lo, hi)
        if _binds("0.0.0.0", port) and _binds(host, port):
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _binds(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
