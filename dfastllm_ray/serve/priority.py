"""The serving processes' CPU priority: Ray starts its workers at nice 15 (`RAY_worker_niceness`
unset), so under plain `serve run` the proxy, ingress, batchers and model replicas (all Ray
workers) ran at nice 15 while a load generator or any other process on the machine ran at nice
0: on a shared box such a process outweighs a nice-15 one about 28 to 1 (the kernel's weights
1024 and 36), and the proxy's refusals and the engine's steps waited behind it.

Each serving process (the proxy gate's callback, every deployment's constructor) moves all its
threads to `DFASTLLM_NICENESS` (default 0, Ray's own processes' niceness; "keep" leaves Ray's
value) when that is below its current niceness and the process may (root or CAP_SYS_NICE);
otherwise it says once how to start Ray at that niceness instead (`RAY_worker_niceness=0`).
Threads started later inherit it from the thread that starts them.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger("ray.serve.dfastllm")   # Serve writes it to the replica's log file

NICENESS_ENV = "DFASTLLM_NICENESS"
PROXY_NICENESS_ENV = "DFASTLLM_PROXY_NICENESS"     # the HTTP proxy's own; unset: NICENESS_ENV's
KEEP = "keep"


def target_niceness(env: str = NICENESS_ENV) -> Optional[int]:
    """The niceness asked for by `env` (an integer, or "keep": None); unset: NICENESS_ENV's
    value, default 0."""
    raw = os.environ.get(env, os.environ.get(NICENESS_ENV, "0")).strip().lower()
    if raw == KEEP:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} must be an integer niceness (-20..19) or "
                         f"{KEEP!r}") from None


def restore_priority(who: str, env: str = NICENESS_ENV) -> Optional[int]:
    """Lower this process's niceness (every thread) to `env`'s target; returns the niceness the
    process has afterwards (None: not Linux, or left as it was by "keep")."""
    target = target_niceness(env)
    if target is None or not hasattr(os, "setpriority"):
        return None
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= target:
        return current
    try:
        for tid in _threads():
            _set_thread(tid, target)
    except PermissionError:
        log.warning("%s runs at nice %d and may not lower it to %d; start Ray with "
                    "RAY_worker_niceness=%d (or set %s=%s)", who, current, target, target,
                    env, KEEP)
        return current
    log.info("%s: nice %d -> %d (%s)", who, current, target, env)
    return os.getpriority(os.PRIO_PROCESS, 0)


def _set_thread(tid: int, niceness: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except ProcessLookupError:        # the thread ended since the list was read: the rest go on
        pass


def _threads() -> list[int]:
    """This process's thread ids (on Linux a niceness is per thread); [0] elsewhere."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
