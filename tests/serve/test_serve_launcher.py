"""The launchers as processes: `serve run configs/tiny.yaml` (the README's first command) and
the draining `python -m dfastllm_ray.serve run`, each started, loaded and sent SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_testutil import AUTH

pytestmark = pytest.mark.ray
MODEL = "tiny-llada"
PROMPT = "Reverse the string: abcdef"


def stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/engine/stats", headers=AUTH).json()["models"][MODEL]


def tiny_app(tmp_path: Path) -> tuple[Path, int, dict]:
    """configs/tiny.yaml on a free port, written to tmp_path -> (path, port, subprocess env)."""
    import yaml
    from serve_testutil import ROOT, free_port, tiny_config
    cfg = tiny_config()
    port = cfg["http_options"]["port"] = free_port()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port, {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


def wait_ready(proc: subprocess.Popen, url: str, what: str, timeout_s: float = 150) -> None:
    """Poll /health/ready until 200; fail if the process exits or the timeout passes."""
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited early"
        assert time.time() < deadline, f"{what} never became ready"
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


@pytest.mark.slow
def test_serve_run_answers_and_exits_on_sigterm(tmp_path):
    """The README's first command: `serve run configs/tiny.yaml`, then SIGTERM (what Kubernetes
    and process managers send) must stop it within ~10 s."""
    from serve_testutil import ROOT
    path, port, env = tiny_app(tmp_path)
    serve_cli = Path(sys.executable).with_name("serve")
    # --address local: a fresh cluster, never one another process started on this machine.
    proc = subprocess.Popen([str(serve_cli), "run", "--address", "local", str(path)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, "serve run")
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                      "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, r.text
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.time() - t0 < 12
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_launcher_drains_on_sigterm(tmp_path):
    """`python -m dfastllm_ray.serve run configs/tiny.yaml`, SIGTERM under load: nothing new is
    admitted, the admitted stream and unary requests finish ([DONE] / 200), then it exits 0
    without a traceback."""
    from serve_testutil import ROOT
    path, port, env = tiny_app(tmp_path)
    log = open(tmp_path / "launcher.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "dfastllm_ray.serve", "run", str(path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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

    try:
        wait_ready(proc, url, "the launcher")
        threads = [threading.Thread(target=stream)] + \
            [threading.Thread(target=unary, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while httpx.get(f"{url}/v1/engine/stats").json()["ingress"]["inflight"] < 5:
            assert time.time() < deadline, "the requests were never admitted"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30                       # the launcher has seen the signal
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 503:
                    break
            except httpx.TransportError:
                break
            time.sleep(0.05)
        late, codes = None, []
        while time.time() < deadline and proc.poll() is None:   # draining: nothing admitted
            try:
                late = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
                codes.append(late.status_code)
            except httpx.TransportError:
                late = None
                codes.append("refused")
            if late is not None and late.status_code == 503:
                break
            time.sleep(0.05)
        # a late request is refused: a 503 with Retry-After while the drain runs, or no
        # connection once the listener is closed; never served
        assert codes and 200 not in codes, codes
        assert late is None or (late.status_code == 503 and late.headers["retry-after"]), codes
        for t in threads:
            t.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert results["stream"][-1] == "data: [DONE]" and len(results["stream"]) >= 17
    assert all(results[f"unary{i}"].status_code == 200 for i in range(4))
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "drained: 5 admitted, 5 finished, 0 cut" in text, text[-3000:]
