"""One Ray cluster and one Serve application per test session (RAY_SERVE.md section 4.3).

Environment set before Ray starts: no token auth (pitfall 1), workers at normal priority
(pitfall 2), no usage reporting, everything on loopback (pitfall 11). Workers import the project
from the checkout through PYTHONPATH (pitfall 5), so the tests need no `pip install -e .`.
"""
from __future__ import annotations

import os

import pytest

for _key, _value in {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0",
                     "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(_key, _value)

from serve_testutil import APP_NAME, HERE, ROOT, fake_args, free_port, tiny_args  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """Yields the Prometheus port of this cluster's metrics agent (reports every second)."""
    import ray
    pythonpath = os.pathsep.join([str(ROOT), str(HERE)])
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield metrics_port
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """The app of configs/tiny.yaml (real engine, tiny shipped model) on a free port."""
    from ray import serve

    from dfastllm_ray.serve.app import build_app
    from dfastllm_ray.serve.config import ModelConfig
    source = ModelConfig.model_validate(tiny_args()["models"][0]).model_source
    # Fail in a second with the reason, not after Serve's constructor retries.
    assert os.path.isdir(source), f"configs/tiny.yaml's model folder is missing: {source}"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(tiny_args()), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def fake_url(serve_url):
    """A second app (the small test engine, tight limits) under /fake on the same proxy."""
    from ray import serve

    from dfastllm_ray.serve.app import build_app
    import httpx
    serve.run(build_app(fake_args()), name="fake", route_prefix="/fake")
    url = f"{serve_url}/fake"
    # Warm up first: fresh handles spend a second or more discovering replicas, which would
    # blur the timing-sensitive tests (backpressure, timeouts); the app's timeout is 1.5 s.
    for _ in range(5):
        r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "x"},
                       headers={"Authorization": "Bearer k-backpressure"}, timeout=30)
        if r.status_code == 200:
            break
    assert r.status_code == 200, r.text
    return url
