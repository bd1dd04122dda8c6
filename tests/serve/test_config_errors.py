"""A bad `args:` mapping fails at build with one line per problem: the YAML path (a model by
its id), the value given, what is wrong, and for a misspelt key the field it most likely meant.
Ray's own schemas are applied to what is handed to Ray as is (autoscaling, actor options)."""
from __future__ import annotations

import copy

import pytest

from dfastllm_ray.serve.app import build_app
from dfastllm_ray.serve.config import AppArgs
from dfastllm_ray.serve.config_errors import ConfigError, check_keys, did_you_mean

BASE = {"models": [{"model_id": "tiny", "engine": {"device": "cpu"}}]}


def model(**fields):
    args = copy.deepcopy(BASE)
    args["models"][0].update(fields)
    return args


def deployment(**fields):
    return model(deployment=fields)


@pytest.mark.parametrize("args,line", [
    ({**BASE, "modls": []}, "modls: unknown field (did you mean 'models'?)"),
    (model(modle_source="x"), "models[tiny].modle_source: unknown field (did you mean "
                              "'model_source'?); the fields here are: batcher, deployment"),
    (model(engine={"max_num_seq": 4}),
     "models[tiny].engine.max_num_seq: unknown field (did you mean 'max_num_seqs'?)"),
    (model(engine={"max_num_seqs": 0}), "models[tiny].engine.max_num_seqs=0 is invalid"),
    (model(sampling_defaults={"stepz": 4}),
     "models[tiny].sampling_defaults.stepz: unknown field (did you mean 'steps'?)"),
    (model(sampling_defaults={"steps": 0}), "models[tiny].sampling_defaults.steps=0 is invalid"),
    (deployment(num_replicas=-1), "models[tiny].deployment.num_replicas=-1: Input should be "
                                  "greater than or equal to 1; or Input should be 'auto'"),
    (deployment(ray_actor_options={"num_cpu": 1}),
     "models[tiny].deployment.ray_actor_options.num_cpu: unknown field (did you mean "
     "'num_cpus'?)"),
    (deployment(ray_actor_options={"num_cpus": -1}),
     "models[tiny].deployment.ray_actor_options.num_cpus=-1: Input should be greater than"),
    (deployment(autoscaling_config={"max_replica": 2}),
     "models[tiny].deployment.autoscaling_config.max_replica: unknown field (did you mean "
     "'max_replicas'?)"),
    (deployment(autoscaling_config={"min_replicas": 3, "max_replicas": 1}),
     "models[tiny].deployment.autoscaling_config: max_replicas (1) must be greater than or "
     "equal to min_replicas (3)"),
    ({"models": [{"model_source": "x"}]}, "models[0].model_id: required field missing"),
    ({"models": {"model_id": "x"}}, "models: Input should be a valid list"),
])
def test_each_mistake_is_one_line_naming_path_value_and_fix(args, line):
    with pytest.raises(ConfigError) as err:
        build_app(args)
    assert line in str(err.value)
    assert "\n" not in str(err.value) and "errors.pydantic.dev" not in str(err.value)


def test_every_problem_is_listed_at_once():
    args = {**model(modle_source="x", max_inflight=0), "rate_limit": {"requests_per_second": 0}}
    with pytest.raises(ConfigError) as err:
        AppArgs.parse(args)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {
        "rate_limit.requests_per_second=0", "models[tiny].max_inflight=0",
        "models[tiny].modle_source"}


def test_a_config_error_is_a_value_error():
    """Callers (and Ray's build task) that catch ValueError keep working."""
    assert issubclass(ConfigError, ValueError)


def test_suggestions_only_when_close():
    assert did_you_mean("num_cpu", ["num_cpus", "memory"]) == " (did you mean 'num_cpus'?)"
    assert did_you_mean("zzz", ["num_cpus", "memory"]) == ""
    check_keys({"memory": 1}, ["memory"], "x")           # known keys pass
    with pytest.raises(ConfigError, match=r"x\.zzz: unknown field; the fields here are: memory"):
        check_keys({"zzz": 1}, ["memory"], "x")


def test_a_partial_deployment_block_keeps_the_other_defaults():
    """`deployment: {num_replicas: 2}` alone must not drop max_ongoing_requests to Serve's 5."""
    args = AppArgs.parse({"models": [{"model_id": "m", "deployment": {"num_replicas": 2},
                                      "batcher": {"deployment": {"max_ongoing_requests": 7}}}],
                          "ingress": {"num_replicas": 2}})
    replica = args.models[0].deployment.serve_options()
    assert replica["num_replicas"] == 2 and replica["max_ongoing_requests"] == 64
    assert replica["graceful_shutdown_timeout_s"] == 60
    batcher = args.models[0].batcher.deployment.serve_options()
    assert batcher["max_ongoing_requests"] == 7 and batcher["ray_actor_options"] == {"num_cpus": 0}
    assert args.ingress.serve_options()["max_ongoing_requests"] == 512
    null = AppArgs.parse({"models": [{"model_id": "m",
                                      "deployment": {"max_ongoing_requests": None}}]})
    assert "max_ongoing_requests" not in null.models[0].deployment.serve_options()


@pytest.mark.parametrize("ongoing,warned", [(8, True), (None, True), (32, False)])
def test_replica_slots_no_request_can_fill_are_warned(caplog, ongoing, warned):
    build_app(model(engine={"device": "cpu", "max_num_seqs": 32},
                    deployment={"max_ongoing_requests": ongoing}))
    text = "models[tiny].deployment.max_ongoing_requests="
    assert (text in caplog.text) == warned
    if warned:
        assert "engine.max_num_seqs=32" in caplog.text and "set max_ongoing_requests >= 32" \
            in caplog.text
