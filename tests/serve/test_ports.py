"""`serve/ports.py`: a port for a test's or a benchmark's server, outside the kernel's ephemeral
range (where Ray's own processes bind port 0 while a cluster starts), free when picked."""
from __future__ import annotations

import socket

from dfastllm_ray.serve import ports


def test_a_port_below_the_ephemeral_range_and_above_rays_worker_ports_that_binds():
    for _ in range(20):
        port = ports.free_port()
        assert ports.RAY_WORKER_PORTS_END < port < ports.ephemeral_start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_returned(monkeypatch):
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        taken = held.getsockname()[1]
        real, calls = ports.random.randint, []

        def randint(lo: int, hi: int) -> int:          # the taken port first, twice
            calls.append(1)
            return taken if len(calls) <= 2 else real(lo, hi)
        monkeypatch.setattr(ports.random, "randint", randint)
        assert ports.free_port() != taken and len(calls) >= 3


def test_no_room_below_the_ephemeral_range_falls_back_to_the_kernels_choice(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_start", lambda: ports.RAY_WORKER_PORTS_END + 1)
    port = ports.free_port()
    assert 0 < port < 65536
