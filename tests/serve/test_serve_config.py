"""Builder arguments and configs: every YAML builds, bad fields fail at start naming the field,
and the pieces between the engine and the API (defaults, gauges, error mapping) behave."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from ray.serve.exceptions import BackPressureError
from ray.serve.schema import ServeDeploySchema
from serve_fakes import FakeEngine, fake_card

from dfastllm_ray.serve.app import build_app
from dfastllm_ray.serve.config import AppArgs, ModelConfig, shipped_tiny_model
from dfastllm_ray.serve.metrics import engine_gauges, step_totals
from dfastllm_ray.serve.replica import ReplicaCore, generation_defaults
from dfastllm_ray.serve.server import map_downstream_error

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny", "llada", "dream"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_is_valid_and_builds(path):
    cfg = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(cfg)               # what `serve run` / KubeRay check
    for app in cfg["applications"]:
        assert app["import_path"] == "dfastllm_ray.serve.app:build_app"
        assert build_app(app["args"]) is not None       # builds the graph; loads nothing


def test_tiny_config_uses_the_shipped_model_on_cpu():
    args = AppArgs.model_validate(yaml.safe_load(
        (CONFIGS[0].parent / "tiny.yaml").read_text())["applications"][0]["args"])
    model = args.models[0]
    assert model.model_source == shipped_tiny_model() and model.engine["device"] == "cpu"
    assert "num_gpus" not in (model.deployment.ray_actor_options or {})


@pytest.mark.parametrize("args,field", [
    ({"models": [{"model_id": "m", "enigne": {}}]}, "enigne"),
    ({"models": [{"model_id": "m"}], "rate_limits": {}}, "rate_limits"),
    ({"models": [{"model_id": "m", "deployment": {"num_replica": 2}}]}, "num_replica"),
    ({"models": [{"model_id": "m", "batcher": {"max_batch": 2}}]}, "max_batch"),
    ({"models": [{"model_id": "m", "engine": {"kv_mode": "dual"}}]}, "kv_mode"),
    ({"models": [{"model_id": "m", "engine": {"kv_cache_mode": "triple"}}]}, "kv_cache_mode"),
    ({"models": [{"model_id": "m", "sampling_defaults": {"threshold": 3}}]}, "threshold"),
    ({"models": [{"model_id": "m", "sampling_defaults": {"stepz": 3}}]}, "stepz"),
    ({"models": [{"model_id": "m"}, {"model_id": "m"}]}, "model_id"),
    ({"models": []}, "models"),
    ({"models": [{"model_id": "m", "deployment": {"num_replicas": 2,
                                                  "autoscaling_config": {"max_replicas": 3}}}]},
     "autoscaling_config"),
])
def test_bad_field_rejected_at_start_naming_it(args, field):
    with pytest.raises(ValueError) as err:
        build_app(args)
    assert field in str(err.value)


def test_generation_defaults_map_and_override():
    gen = {"max_new_tokens": 16, "eos_token_id": 3, "steps": None, "temperature": 0.0}
    assert generation_defaults(gen, {"block_length": 8}) == {
        "max_tokens": 16, "temperature": 0.0, "block_length": 8}


def test_engine_stats_to_gauges():
    stats = {"num_waiting": 3, "num_running": 5, "num_pages": 100, "free_pages": 25,
             "prefix_hit_rate": 0.5, "engine_steps": 10, "ms_per_step": 20.0}
    assert engine_gauges(stats) == {"queue_length": 3.0, "running": 5.0, "kv_pool_usage": 0.75,
                                    "prefix_cache_hit_rate": 0.5}
    assert step_totals(stats) == (10.0, 0.2)
    assert engine_gauges({}) == {} and step_totals({}) is None


@pytest.mark.parametrize("exc,status", [
    (BackPressureError(num_queued_requests=3, max_queued_requests=3), 503),
    (ValueError("steps=3 is invalid: x"), 400),
    (TimeoutError("late"), 504),
    (RuntimeError("boom"), 500),
])
def test_downstream_errors_map_to_statuses(exc, status):
    assert map_downstream_error(exc).status == status


def test_wrapped_errors_are_unwrapped():
    class Wrapped(Exception):           # what Ray's RayTaskError looks like: the cause attached
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last): ... remote frames ...")
            self.cause = cause

    err = map_downstream_error(Wrapped(Wrapped(ValueError("threshold=7 is invalid: rule"))))
    assert (err.status, err.param, err.message) == (400, "threshold",
                                                     "threshold=7 is invalid: rule")
    assert "Traceback" not in map_downstream_error(Wrapped(RuntimeError("x"))).message


def test_replica_health_follows_engine():
    engine = FakeEngine()
    core = ReplicaCore(ModelConfig(model_id="fake"), engine, fake_card())
    asyncio.run(core.check_health())
    engine.dead = True
    with pytest.raises(RuntimeError):
        asyncio.run(core.check_health())


@pytest.mark.parametrize("knob,value,words", [("alg", "entropy", "llada-family.*remove it"),
                                              ("top_k", 5, "llada-family.*remove it"),
                                              ("max_tokens", 10**6, "context is 256.*at most 255")])
def test_a_default_no_request_could_use_is_refused_at_start(knob, value, words):
    """tiny-llada is LLaDA-family with 256 positions: a Dream knob, or a max_tokens past the
    context, in its sampling_defaults would turn every request that leaves it out into a 400
    naming a field the client never sent."""
    from dfastllm_ray.serve.replica import build_engine
    cfg = ModelConfig(model_id="m", engine={"device": "cpu"}, sampling_defaults={knob: value})
    with pytest.raises(ValueError, match=rf"models\[m\]\.sampling_defaults\.{knob}=.*{words}"):
        build_engine(cfg)
