"""The proxy gate under plain `serve run configs/<name>.yaml`: each config sets it through
`controller_options.runtime_env.env_vars` (the Serve controller's env, which the HTTP proxy it
starts inherits), at the cap the launcher and the KubeRay manifests use."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from dfastllm_ray.serve import proxy_gate
from dfastllm_ray.serve.launcher import proxy_gate_cap, proxy_gate_env

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def gate_env(cfg: dict) -> dict:
    return cfg["controller_options"]["runtime_env"]["env_vars"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_sets_the_gate_at_the_launchers_cap(path):
    cfg = yaml.safe_load(path.read_text())
    env = gate_env(cfg)
    assert env[proxy_gate.CALLBACK_ENV] == proxy_gate.CALLBACK
    assert int(env[proxy_gate.MAX_INFLIGHT_ENV]) == proxy_gate_cap(cfg) > 0
    assert {k: str(v) for k, v in env.items() if k in proxy_gate_env(cfg)} == proxy_gate_env(cfg)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.fresh_cluster
def test_plain_serve_run_gets_the_proxy_gate(tmp_path):
    """`serve run` (Ray's CLI, not the launcher), the config's cap set to 1 and nothing in the
    environment: of two requests held in flight, one is refused by the proxy with the OpenAI 503
    and Retry-After, and the ingress refuses nothing."""
    from test_serve_proxy_gate import _held_request as held_request
    from test_serve_proxy_gate import assert_one_refused_by_the_proxy
    from app_process import start_app, stop_app, tiny_app
    path, port, env = tiny_app(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    gate_env(cfg)[proxy_gate.MAX_INFLIGHT_ENV] = "1"
    path.write_text(yaml.safe_dump(cfg))
    for name in (proxy_gate.CALLBACK_ENV, proxy_gate.MAX_INFLIGHT_ENV):
        env.pop(name, None)
    serve_cli = Path(sys.executable).with_name("serve")
    url = f"http://127.0.0.1:{port}"
    proc = start_app([str(serve_cli), "run", "--address", "local", str(path)], url, env,
                     tmp_path / "serve_run.log", ROOT)
    try:
        assert_one_refused_by_the_proxy(url, [held_request(port), held_request(port)])
    finally:
        stop_app(proc)
