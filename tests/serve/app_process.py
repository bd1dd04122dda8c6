"""An app launcher (`serve run ...` or `python -m dfastllm_ray.serve run ...`) as a test's child
process: started in its own process group with its output in a log, waited on until
/health/ready answers 200, and stopped at the end.

Each of these starts a fresh Ray cluster (their tests, marked `fresh_cluster`, run before the
suite's session cluster exists: tests/conftest.py). Under a heavy CPU load, Ray's own `ray.init`
can still give up before our code runs: it waits a hard-coded 30 s for the
raylet to register (`ray/_private/node.py`) and raises "The current node timed out during
startup". That is the machine, not the app, so `start_app` starts again when (and only when) the
log names that failure, at most `RAY_STARTUP_ATTEMPTS` times; any other early exit fails the test
with the log's tail."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

RAY_STARTUP_TIMEOUT = "timed out during startup"
RAY_STARTUP_ATTEMPTS = 3


def tiny_app(tmp_path: Path) -> tuple[Path, int, dict]:
    """configs/tiny.yaml on a free port, written to tmp_path -> (path, port, subprocess env)."""
    import yaml
    from serve_testutil import ROOT, free_port, tiny_config
    cfg = tiny_config()
    port = cfg["http_options"]["port"] = free_port()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    return path, port, env


def log_tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else ""


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Poll /health/ready until 200 -> True; False when the process exits first."""
    deadline = time.time() + timeout_s
    while proc.poll() is None:
        assert time.time() < deadline, f"not ready after {timeout_s:.0f} s"
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its own session, so its own group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def start_app(cmd: list[str], url: str, env: dict, log_path: Path, cwd: Path,
              timeout_s: float = 240) -> subprocess.Popen:
    """Start `cmd` and return it once `url`/health/ready is 200 (see the module docstring for
    the one failure that is retried)."""
    for attempt in range(1, RAY_STARTUP_ATTEMPTS + 1):
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            if _wait_ready(proc, url, timeout_s):
                return proc
        except AssertionError:
            kill_group(proc)
            raise AssertionError(f"{cmd[0]} never became ready; its log:\n{log_tail(log_path)}")
        kill_group(proc)                              # its Ray processes, if any are left
        if RAY_STARTUP_TIMEOUT not in log_path.read_text(errors="replace"):
            break
        print(f"attempt {attempt}: Ray's startup timed out under load; starting again")
    raise AssertionError(f"{cmd[0]} exited early; its log:\n{log_tail(log_path)}")


def stop_app(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM if it still runs (a graceful stop), SIGKILL the group if that takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)
