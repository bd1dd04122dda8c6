"""The launchers as processes: `serve run configs/tiny.yaml` (the README's first command) and
the draining `python -m dfastllm_ray.serve run`, each started, loaded and sent SIGTERM."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from app_process import kill_group, start_app, tiny_app
from serve_testutil import ROOT

pytestmark = pytest.mark.ray
MODEL = "tiny-llada"
PROMPT = "Reverse the string: abcdef"


@pytest.mark.slow
@pytest.mark.fresh_cluster
def test_serve_run_answers_and_exits_on_sigterm(tmp_path):
    """The README's first command: `serve run configs/tiny.yaml`, then SIGTERM (what Kubernetes
    and process managers send) must stop it within ~10 s."""
    path, port, env = tiny_app(tmp_path)
    url = f"http://127.0.0.1:{port}"
    serve_cli = Path(sys.executable).with_name("serve")
    # --address local: a fresh cluster, never one another process started on this machine.
    proc = start_app([str(serve_cli), "run", "--address", "local", str(path)], url, env,
                     tmp_path / "serve_run.log", ROOT)
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                      "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, r.text
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.time() - t0 < 12
    finally:
        kill_group(proc)


def _wait_draining(url: str, proc, deadline: float) -> None:
    """Until the launcher has seen the signal: readiness 503, or the listener closed."""
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 503:
                return
        except httpx.TransportError:
            return
        time.sleep(0.05)


def _late_requests(url: str, body: dict, proc, deadline: float) -> tuple:
    """Requests sent while draining, until one is refused with a 503: (the last reply or None
    when the connection was refused, each try's status code or "refused")."""
    late, codes = None, []
    while time.time() < deadline and proc.poll() is None:
        try:
            late = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
            codes.append(late.status_code)
        except httpx.TransportError:
            late = None
            codes.append("refused")
        if late is not None and late.status_code == 503:
            break
        time.sleep(0.05)
    return late, codes


def _stop(proc, how: str) -> None:
    if how == "sigterm":                  # what Kubernetes and process managers send
        proc.send_signal(signal.SIGTERM)
    else:                                 # Ctrl-C in a terminal: SIGINT to the whole group
        os.killpg(proc.pid, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.fresh_cluster
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_launcher_drains_on_signal(tmp_path, how):
    """`python -m dfastllm_ray.serve run configs/tiny.yaml`, SIGTERM to the launcher (or
    Ctrl-C's SIGINT to its whole process group, Ray's processes included) under load: nothing
    new is admitted, the admitted stream and unary requests finish ([DONE] / 200), then it exits
    0 without a traceback."""
    path, port, env = tiny_app(tmp_path)
    url = f"http://127.0.0.1:{port}"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 128, "block_length": 8,
            "steps": 128, "early_exit": False}
    results: dict = {}

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            results["stream"] = [ln for ln in r.iter_lines() if ln.startswith("data: ")]

    def unary(i: int) -> None:
        results[f"unary{i}"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    proc = start_app([sys.executable, "-m", "dfastllm_ray.serve", "run", str(path)], url, env,
                     tmp_path / "launcher.log", ROOT)
    try:
        deadline = time.time() + 60                  # the drain's handle is warm (launcher)
        while "ingress handle warm" not in (tmp_path / "launcher.log").read_text():
            assert time.time() < deadline, "the launcher never warmed its ingress handle"
            time.sleep(0.1)
        threads = [threading.Thread(target=stream)] + \
            [threading.Thread(target=unary, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while httpx.get(f"{url}/v1/engine/stats").json()["ingress"]["inflight"] < 5:
            assert time.time() < deadline, "the requests were never admitted"
            time.sleep(0.05)
        _stop(proc, how)
        deadline = time.time() + 30
        _wait_draining(url, proc, deadline)
        late, codes = _late_requests(url, body, proc, deadline)
        # a late request is refused: a 503 with Retry-After while the drain runs, or no
        # connection once the listener is closed; never served
        assert codes and 200 not in codes, codes
        assert late is None or (late.status_code == 503 and late.headers["retry-after"]), codes
        for t in threads:
            t.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        kill_group(proc)
    assert results["stream"][-1] == "data: [DONE]" and len(results["stream"]) >= 17
    assert all(results[f"unary{i}"].status_code == 200 for i in range(4))
    text = (tmp_path / "launcher.log").read_text()
    assert "Traceback" not in text and "drained: 5 admitted, 5 finished, 0 cut" in text, text[-3000:]
