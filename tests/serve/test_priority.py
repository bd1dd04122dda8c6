"""The serving processes' niceness (`serve/priority.py`), in a child process so this one's
priority is never touched: a process started at nice 15 (as Ray starts its workers) moves every
thread to the target where it may, keeps its niceness with "keep", and rejects a bad value by
naming the variable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dfastllm_ray.serve import priority

CHILD = """
import os, threading, time
from dfastllm_ray.serve.priority import restore_priority
t = threading.Thread(target=time.sleep, args=(5,), daemon=True); t.start()
after = restore_priority("test")
tids = os.listdir("/proc/self/task")
print(after, sorted({os.getpriority(os.PRIO_PROCESS, int(x)) for x in tids}), len(tids))
"""


def run_child(env_value):
    env = {**os.environ}
    env.pop(priority.NICENESS_ENV, None)
    if env_value is not None:
        env[priority.NICENESS_ENV] = env_value
    out = subprocess.run(["nice", "-n", "15", sys.executable, "-c", CHILD], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.split(None, 1)


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux niceness")


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness needs root or CAP_SYS_NICE")
def test_a_nice_15_process_moves_every_thread_to_the_target():
    base = os.getpriority(os.PRIO_PROCESS, 0)           # nice adds to this process's niceness
    after, rest = run_child(None)
    assert int(after) == 0 and rest.split("]")[0] + "]" == "[0]"
    after, rest = run_child("5")
    assert int(after) == 5 and rest.startswith("[5]")
    after, rest = run_child("keep")
    assert after == "None" and rest.startswith(f"[{min(19, base + 15)}]")


def test_a_target_above_the_current_niceness_changes_nothing(monkeypatch):
    monkeypatch.setenv(priority.NICENESS_ENV, "19")
    now = os.getpriority(os.PRIO_PROCESS, 0)
    assert priority.restore_priority("test") == now == os.getpriority(os.PRIO_PROCESS, 0)


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(priority.NICENESS_ENV, "low")
    with pytest.raises(ValueError, match=priority.NICENESS_ENV):
        priority.target_niceness()


def test_a_thread_that_ended_mid_walk_does_not_stop_the_rest(monkeypatch):
    """A thread gone between reading /proc/self/task and setting it (ProcessLookupError) is
    skipped; every other thread is still moved."""
    niceness = {1: 15, 2: 15, 3: 15}

    def setpriority(_which, tid, value):
        if tid == 2:
            raise ProcessLookupError(tid)
        niceness[tid] = value
    monkeypatch.setattr(priority, "_threads", lambda: [1, 2, 3])
    monkeypatch.setattr(priority.os, "setpriority", setpriority)
    monkeypatch.setattr(priority.os, "getpriority", lambda _which, _who: niceness[1])
    monkeypatch.delenv(priority.NICENESS_ENV, raising=False)
    assert priority.restore_priority("test") == 0
    assert niceness == {1: 0, 2: 15, 3: 0}


def test_the_proxy_niceness_falls_back_to_the_shared_one(monkeypatch):
    monkeypatch.delenv(priority.PROXY_NICENESS_ENV, raising=False)
    monkeypatch.delenv(priority.NICENESS_ENV, raising=False)
    assert priority.target_niceness(priority.PROXY_NICENESS_ENV) == 0
    monkeypatch.setenv(priority.NICENESS_ENV, "keep")
    assert priority.target_niceness(priority.PROXY_NICENESS_ENV) is None
    monkeypatch.setenv(priority.PROXY_NICENESS_ENV, "-5")
    assert priority.target_niceness(priority.PROXY_NICENESS_ENV) == -5
    assert priority.target_niceness() is None                 # the others keep theirs
    monkeypatch.setenv(priority.PROXY_NICENESS_ENV, "high")
    with pytest.raises(ValueError, match=priority.PROXY_NICENESS_ENV):
        priority.target_niceness(priority.PROXY_NICENESS_ENV)
