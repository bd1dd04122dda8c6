"""The KubeRay manifests: same Serve config as configs/, valid RayService objects, not stale.

Validation uses KubeRay's RayService CRD schema vendored in tests/fixtures/kuberay/ (no cluster,
no network). Like `kubectl apply` with its default strict field validation, an unknown field is
an error, not silently pruned.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "fixtures" / "kuberay" / "ray.io_rayservices.yaml"
# every configs/<name>.yaml, each with a kuberay/<name>.yaml
NAMES = ("llada", "dream", "tiny", "dream_apd", "sdar", "tiny_sdar")
GPU_NAMES = ("llada", "dream", "dream_apd", "sdar")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_spec = importlib.util.spec_from_file_location("kuberay_render", ROOT / "kuberay" / "render.py")
render = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = render
_spec.loader.exec_module(render)


def strict(schema):
    """The CRD schema as `kubectl apply --validate=strict` reads it: unknown fields rejected,
    `nullable` honoured (OpenAPI v3 keywords that plain JSON Schema lacks)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.load(CRD.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def validator(crd):
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft4Validator(schema)


def load_manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "kuberay" / f"{name}.yaml").read_text())


def schema_errors(validator, obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


def test_every_manifest_has_a_config_and_back():
    manifests = {p.stem for p in (ROOT / "kuberay").glob("*.yaml")}
    configs = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert set(NAMES) <= manifests, f"missing manifests: {set(NAMES) - manifests}"
    assert set(NAMES) == configs, f"configs not in NAMES: {configs - set(NAMES)}"
    assert manifests <= configs, f"manifests without a configs/ file: {manifests - configs}"
    assert set(render.CLUSTERS) == manifests


@pytest.mark.parametrize("name", NAMES)
def test_serve_config_v2_is_the_config_file(name):
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    embedded = load_manifest(name)["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "serveConfigV2 must be a YAML string, not a mapping"
    assert yaml.safe_load(embedded) == yaml.safe_load(text)
    assert embedded == text, "serveConfigV2 should carry the file verbatim (comments included)"


@pytest.mark.parametrize("name", NAMES)
def test_manifest_is_rendered_from_configs(name):
    on_disk = (ROOT / "kuberay" / f"{name}.yaml").read_text()
    assert on_disk == render.render(name), "stale manifest: run python kuberay/render.py"


@pytest.mark.parametrize("name", NAMES)
def test_manifest_is_a_valid_rayservice(name, crd, validator):
    obj = load_manifest(name)
    assert obj["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert obj["kind"] == crd["spec"]["names"]["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", obj["metadata"]["name"])
    assert schema_errors(validator, obj) == []


@pytest.mark.parametrize("name", NAMES)
def test_cluster_conventions(name):
    cluster = load_manifest(name)["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no Serve replica may land on the head"
    head_c = head["template"]["spec"]["containers"][0]
    ports = {p["containerPort"]: p.get("name") for p in head_c["ports"]}
    assert ports[render.SERVE_PORT] == "serve" and ports[render.METRICS_PORT] == "metrics"
    for group in [head, *cluster["workerGroupSpecs"]]:
        c = group["template"]["spec"]["containers"][0]
        assert {"name": "RAY_worker_niceness", "value": "0"} in c["env"]
        assert group["rayStartParams"]["metrics-export-port"] == str(render.METRICS_PORT)
    for group in cluster["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        gpus = int(group["rayStartParams"].get("num-gpus", "0"))
        assert res["limits"].get("nvidia.com/gpu", 0) == gpus == res["requests"].get("nvidia.com/gpu", 0)
        assert group["minReplicas"] <= group["maxReplicas"]
    if name in GPU_NAMES:
        assert any(int(g["rayStartParams"]["num-gpus"]) >= 1 for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize("name", NAMES)
def test_serve_config_runs_on_kubernetes(name):
    """What `serve run` tolerates but a RayService does not: a loopback proxy, local code dirs."""
    cfg = yaml.safe_load(load_manifest(name)["spec"]["serveConfigV2"])
    host = (cfg.get("http_options") or {}).get("host", "0.0.0.0")
    assert host == "0.0.0.0", f"http_options.host={host!r}: the serve Service cannot reach it"
    assert (cfg.get("http_options") or {}).get("port", render.SERVE_PORT) == render.SERVE_PORT
    for app in cfg["applications"]:
        assert app.get("import_path"), app
        wd = (app.get("runtime_env") or {}).get("working_dir")
        assert wd is None or "://" in wd, f"working_dir {wd!r} must be a remote URI on KubeRay"


def _deployments(cfg: dict):
    """Every deployment's options that the builder makes from `args` (models, batchers, ingress)."""
    for app in cfg["applications"]:
        args = app.get("args") or {}
        for model in args.get("models") or []:
            yield model.get("deployment") or {}
            yield (model.get("batcher") or {}).get("deployment") or {}
        yield args.get("ingress") or {}


def _max_replicas(options: dict) -> int:
    auto = options.get("autoscaling_config")
    if auto:
        return auto.get("max_replicas", 1)
    n = options.get("num_replicas", 1)
    return n if isinstance(n, int) else 1


def _pod_limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("name", NAMES)
def test_worker_pods_fit_the_replicas(name):
    """At max scale every GPU and every declared CPU the deployments ask for has a pod."""
    obj = load_manifest(name)
    cfg = yaml.safe_load(obj["spec"]["serveConfigV2"])
    gpus = cpus = 0.0
    for options in _deployments(cfg):
        actor = options.get("ray_actor_options") or {}
        gpus += _max_replicas(options) * actor.get("num_gpus", 0)
        cpus += _max_replicas(options) * actor.get("num_cpus", 0)
    groups = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    have_gpus = sum(g["maxReplicas"] * int(_pod_limits(g).get("nvidia.com/gpu", 0)) for g in groups)
    have_cpus = sum(g["maxReplicas"] * float(_pod_limits(g)["cpu"]) for g in groups)
    assert have_gpus >= gpus and have_cpus >= cpus, (name, gpus, have_gpus, cpus, have_cpus)
    if name in GPU_NAMES:
        assert have_gpus == gpus, "more GPU pods than replicas can use"


@pytest.mark.parametrize("name", NAMES)
def test_serve_config_parses_as_ray_serve_schema(name):
    schema = pytest.importorskip("ray.serve.schema")
    cfg = yaml.safe_load(load_manifest(name)["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.model_validate(cfg)


def _break_num_gpus_type(m):  # rayStartParams values are strings in the CRD
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1


def _drop_max_replicas(m):
    del m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"]


def _config_as_mapping(m):  # a common mistake: serveConfigV2 is a string, not a mapping
    m["spec"]["serveConfigV2"] = yaml.safe_load(m["spec"]["serveConfigV2"])


def _misspell_field(m):
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4


def _drop_container_name(m):
    del m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]


def _bad_gpu_quantity(m):
    res = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    res["resources"]["limits"]["nvidia.com/gpu"] = "one"


@pytest.mark.parametrize("breakage", [_break_num_gpus_type, _drop_max_replicas, _config_as_mapping,
                                      _misspell_field, _drop_container_name, _bad_gpu_quantity])
def test_broken_manifest_is_rejected(breakage, validator):
    broken = copy.deepcopy(load_manifest("llada"))
    breakage(broken)
    assert schema_errors(validator, broken), f"{breakage.__name__} passed validation"


def test_render_check_reports_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "OUT_DIR", tmp_path)
    assert render.main(["tiny", "--check"]) == 1  # nothing rendered there yet
    assert render.main(["tiny"]) == 0
    assert render.main(["tiny", "--check"]) == 0
    (tmp_path / "tiny.yaml").write_text((tmp_path / "tiny.yaml").read_text() + "# edited\n")
    assert render.main(["tiny", "--check"]) == 1


def test_a_config_with_a_typo_is_not_rendered(tmp_path, monkeypatch):
    """The launcher's checks run before a manifest is written: a misspelt key fails here, not
    in a pod's controller log."""
    text = (ROOT / "configs" / "tiny.yaml").read_text().replace("model_id:", "modle_id:", 1)
    (tmp_path / "tiny.yaml").write_text(text)
    monkeypatch.setattr(render, "CONFIGS", tmp_path)
    with pytest.raises(ValueError, match=r"(?s)configs/tiny\.yaml: .*modle_id: unknown field "
                                         r"\(did you mean 'model_id'\?\)"):
        render.render("tiny")
