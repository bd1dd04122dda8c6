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

from serve_testutil import APP_NAME, HERE, ROOT, free_port, tiny_args  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    pythonpath = os.pathsep.join([str(ROOT), str(HERE)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """The app of configs/tiny.yaml (real engine, tiny shipped model) on a free port."""
    from ray import serve

    from dfastllm_ray.serve.app import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(tiny_args()), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
