"""Helpers shared by the serve tests and their conftest (a plain module: `import conftest` could
pick up another directory's conftest)."""
from __future__ import annotations

import copy
from pathlib import Path

from dfastllm_ray.serve.ports import free_port  # noqa: F401  (re-exported to the tests)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
APP_NAME = "dfastllm"
API_KEY = "sk-test-key"                 # the session app has auth on; health routes stay open
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Fast replica teardown at the end of the session (defaults cost ~3 s per deployment).
FAST_SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1}


def tiny_config() -> dict:
    import yaml
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def tiny_args() -> dict:
    """configs/tiny.yaml's application args, with test-speed shutdown and no CPU reservations
    (the 2-CPU test cluster must never be blocked from scheduling by its own actors)."""
    args = copy.deepcopy(tiny_config()["applications"][0]["args"])
    args["api_keys_env"] = None
    args["api_keys"] = [API_KEY]
    for model in args["models"]:
        model["deployment"].update(FAST_SHUTDOWN)
        model["deployment"]["ray_actor_options"] = {"num_cpus": 0}
        model["batcher"].setdefault("deployment", {}).update(FAST_SHUTDOWN)
    args.setdefault("ingress", {}).update(FAST_SHUTDOWN)
    return args


def fake_args() -> dict:
    """A second app on the same cluster: the small test engine behind tight limits, to drive
    backpressure, rate limits and timeouts through real Serve in milliseconds."""
    return {
        "api_keys_env": None, "api_keys": ["k-backpressure", "k-rate", "k-timeout"],
        "request_timeout_s": 1.5,
        # rare pings: with one replica slot (max_ongoing_requests 1), a ping takes that slot
        "health_poll_s": 5,
        "rate_limit": {"requests_per_second": 0.2, "burst": 10},
        "ingress": {**FAST_SHUTDOWN, "ray_actor_options": {"num_cpus": 0}},
        "models": [{
            "model_id": "fake", "engine_factory": "serve_fakes:build_fake_engine",
            "batcher": {"deployment": {**FAST_SHUTDOWN, "ray_actor_options": {"num_cpus": 0}}},
            "deployment": {**FAST_SHUTDOWN, "max_ongoing_requests": 1, "max_queued_requests": 1,
                           "ray_actor_options": {"num_cpus": 0}},
        }],
    }


def in_process_http(entries: dict):
    """{model_id: ModelConfig} -> a TestClient over the real ingress routes and a ReplicaCore
    per model (the production factory, no Ray), with `.cores`; a context manager that shuts
    the cores down after."""
    from contextlib import contextmanager

    from fastapi.testclient import TestClient

    from dfastllm_ray.serve.api import build_api
    from dfastllm_ray.serve.clients import LocalClient
    from dfastllm_ray.serve.config import ServerSettings
    from dfastllm_ray.serve.guards import ApiKeys
    from dfastllm_ray.serve.replica import ReplicaCore, build_engine
    from dfastllm_ray.serve.server import OpenAIServer

    @contextmanager
    def serving():
        cores = {m: ReplicaCore(cfg, *build_engine(cfg)) for m, cfg in entries.items()}
        server = OpenAIServer(ServerSettings(api_keys_env=None),
                              {m: LocalClient(c) for m, c in cores.items()})
        try:
            with TestClient(build_api(server, ApiKeys([]))) as client:
                client.cores = cores
                yield client
        finally:
            for core in cores.values():
                core.shutdown()
    return serving()


def ready_app(serve_url: str, name: str, args: dict):
    """A generator for a module fixture: `build_app(args)` run as app `name` under `/<name>` on
    the session's proxy; yields its URL once `/health/ready` answers 200, deletes it after."""
    import time

    import httpx
    from ray import serve

    from dfastllm_ray.serve.app import build_app
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    url = f"{serve_url}/{name}"
    deadline = time.time() + 60
    while httpx.get(f"{url}/health/ready").status_code != 200:
        assert time.time() < deadline, f"the {name} app never became ready"
        time.sleep(0.2)
    yield url
    serve.delete(name)
