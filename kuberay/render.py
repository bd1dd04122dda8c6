"""Render the KubeRay RayService manifests `kuberay/<name>.yaml` from `configs/<name>.yaml`.

`spec.serveConfigV2` is the config file's text, byte for byte, so `serve run configs/llada.yaml`
and the RayService deploy the same applications; only the cluster around them (image, pods,
GPUs, ports) is declared here. Never edit the manifests by hand: change `configs/` or the
`CLUSTERS` table below and run

    python kuberay/render.py            # rewrite every manifest
    python kuberay/render.py --check    # exit 1 when a manifest is stale (as tests/test_kuberay.py)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from dfastllm_ray.serve.launcher import config_problem, proxy_gate_env  # noqa: E402

CONFIGS = ROOT / "configs"
OUT_DIR = ROOT / "kuberay"
RAY_VERSION = "2.60.0"
IMAGE = "dfastllm-ray:0.1.0"        # kuberay/Dockerfile; push it where the cluster can pull it
METRICS_PORT = 8080                 # Ray's Prometheus export port on every node (docs/metrics.md)
SERVE_PORT = 8000
HF_CACHE = "/home/ray/.cache/huggingface"


@dataclass(frozen=True)
class WorkerGroup:
    """One Ray worker pod shape. The Ray autoscaler adds pods between min and max replicas; for
    a GPU group they come from the config (`gpu_demand`), so the pods always fit the replicas."""
    name: str
    gpus: int              # nvidia.com/gpu per pod, and Ray's num-gpus
    cpus: str              # Kubernetes CPU quantity per pod
    memory: str            # Kubernetes memory quantity per pod
    shm: str               # /dev/shm size: Ray's object store lives there
    cpu_pods: int = 1      # pod count of a CPU-only group (gpus == 0)


@dataclass(frozen=True)
class Cluster:
    worker: WorkerGroup
    head_cpus: str = "2"        # for the Serve controller, proxy, dashboard and GCS; Ray sees 0
    head_memory: str = "8Gi"


# An 8B model in bfloat16 is ~16 GB of weights: one GPU per model replica. 8 CPUs per pod hold
# a model replica (num_cpus 4 in the configs) and an ingress replica or two.
CLUSTERS = {
    "llada": Cluster(WorkerGroup("gpu", gpus=1, cpus="8", memory="48Gi", shm="8Gi")),
    "dream": Cluster(WorkerGroup("gpu", gpus=1, cpus="8", memory="48Gi", shm="8Gi")),
    # Dream-7B + its Qwen2.5-0.5B verifier share one GPU per replica (configs/dream_apd.yaml)
    "dream_apd": Cluster(WorkerGroup("gpu", gpus=1, cpus="8", memory="48Gi", shm="8Gi")),
    # SDAR-4B (block diffusion) in bfloat16: ~8 GB of weights, one GPU per replica (configs/sdar.yaml)
    "sdar": Cluster(WorkerGroup("gpu", gpus=1, cpus="8", memory="32Gi", shm="8Gi")),
    # the project's own tiny model runs on CPU (configs/tiny.yaml): no GPU, one small pod
    "tiny": Cluster(WorkerGroup("cpu", gpus=0, cpus="2", memory="4Gi", shm="1Gi"),
                    head_memory="4Gi"),
    "tiny_sdar": Cluster(WorkerGroup("cpu", gpus=0, cpus="2", memory="4Gi", shm="1Gi"),
                         head_memory="4Gi"),
}


def _replica_range(options: dict) -> tuple[int, int]:
    """(min, max) replicas of one deployment's options, with Serve's defaults (1, 1)."""
    auto = options.get("autoscaling_config")
    if auto:
        return int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
    n = options.get("num_replicas", 1)
    return (n, n) if isinstance(n, int) else (1, 1)


def gpu_demand(serve_config: dict) -> tuple[int, int]:
    """(min, max) GPUs the model replicas of every application ask for (`args.models[]`)."""
    low = high = 0
    for app in serve_config.get("applications") or []:
        for model in (app.get("args") or {}).get("models") or []:
            options = model.get("deployment") or {}
            gpus = float((options.get("ray_actor_options") or {}).get("num_gpus", 0))
            lo, hi = _replica_range(options)
            low, high = low + gpus * lo, high + gpus * hi
    return math.ceil(low), math.ceil(high)


def worker_range(group: WorkerGroup, serve_config: dict) -> tuple[int, int]:
    """(minReplicas, maxReplicas) of the worker group."""
    if not group.gpus:
        return group.cpu_pods, group.cpu_pods
    low, high = gpu_demand(serve_config)
    if high == 0:
        raise ValueError(f"worker group {group.name!r} has GPUs but the config asks for none: "
                         "set ray_actor_options.num_gpus on the model deployment")
    return max(1, math.ceil(low / group.gpus)), math.ceil(high / group.gpus)


class _Literal(str):
    """A string dumped as a YAML block literal (`|`), so the config stays readable in the manifest."""


def _literal(dumper: yaml.SafeDumper, data: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # repeat equal dicts instead of &id001 anchors
        return True


_Dumper.add_representer(_Literal, _literal)


def _secret_env(name: str, secret: str, key: str) -> dict:
    """An env var from a Secret that may not exist (then the variable is simply unset)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         "optional": True}}}


def _env(serve_config: dict) -> list[dict]:
    env = [
        {"name": "RAY_worker_niceness", "value": "0"},  # Ray starts workers at nice 15 otherwise
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # read by the ingress replicas (args.api_keys_env); no Secret: auth off
        _secret_env("DFASTLLM_API_KEYS", "dfastllm-api-keys", "keys"),
    ]
    # the proxy gate (dfastllm_ray/serve/proxy_gate.py), as the launcher installs it
    env += [{"name": k, "value": v} for k, v in proxy_gate_env(serve_config).items()]
    return env


def head_group(cluster: Cluster, image: str, serve_config: dict) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"},
             {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"},
             {"containerPort": SERVE_PORT, "name": "serve"},
             {"containerPort": METRICS_PORT, "name": "metrics"}]
    res = {"cpu": cluster.head_cpus, "memory": cluster.head_memory}
    container = {"name": "ray-head", "image": image, "ports": ports, "env": _env(serve_config),
                 "resources": {"requests": res, "limits": res}}
    return {
        # num-cpus 0: Serve replicas never land on the head; it only runs the control plane
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0",
                           "metrics-export-port": str(METRICS_PORT)},
        "template": {"spec": {"containers": [container]}},
    }


def _worker_resources(group: WorkerGroup) -> dict:
    res: dict = {"cpu": group.cpus, "memory": group.memory}
    if group.gpus:
        res["nvidia.com/gpu"] = group.gpus
    return {"requests": dict(res), "limits": dict(res)}


def worker_group(group: WorkerGroup, replicas: tuple[int, int], image: str,
                 serve_config: dict) -> dict:
    # HF_TOKEN: gated or private models
    env = _env(serve_config) + [_secret_env("HF_TOKEN", "hf-token", "token")]
    container = {"name": "ray-worker", "image": image, "env": env,
                 "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
                 "resources": _worker_resources(group),
                 "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                                  {"name": "hf-cache", "mountPath": HF_CACHE}]}
    pod: dict = {"containers": [container],
                 "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": group.shm}},
                             {"name": "hf-cache", "emptyDir": {}}]}
    if group.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    start = {"num-gpus": str(group.gpus), "metrics-export-port": str(METRICS_PORT)}
    return {"groupName": group.name, "replicas": replicas[0],
            "minReplicas": replicas[0], "maxReplicas": replicas[1],
            "rayStartParams": start, "template": {"spec": pod}}


def manifest(name: str, serve_config: str, image: str = IMAGE) -> dict:
    """The RayService object for configs/<name>.yaml, whose text is `serve_config`."""
    cluster = CLUSTERS[name]
    parsed = yaml.safe_load(serve_config)
    replicas = worker_range(cluster.worker, parsed)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": f"dfastllm-{name.replace('_', '-')}", "labels": {"app.kubernetes.io/name": "dfastllm-ray",
                                                             "app.kubernetes.io/instance": name}},
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": _Literal(serve_config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": head_group(cluster, image, parsed),
                "workerGroupSpecs": [worker_group(cluster.worker, replicas, image, parsed)],
            },
        },
    }


def render(name: str, image: str = IMAGE) -> str:
    """The manifest text; a config with a problem (`launcher.config_problem`) is refused, so a
    typo is caught here, not in a pod's controller log."""
    problem = config_problem(str(CONFIGS / f"{name}.yaml"))
    if problem:
        raise ValueError(f"configs/{name}.yaml: {problem}")
    serve_config = (CONFIGS / f"{name}.yaml").read_text()
    body = yaml.dump(manifest(name, serve_config, image), Dumper=_Dumper, sort_keys=False,
                     width=100, default_flow_style=False)
    header = (f"# Generated by kuberay/render.py from configs/{name}.yaml: do not edit by hand.\n"
              f"# kubectl apply -f kuberay/{name}.yaml   (see kuberay/README.md)\n")
    return header + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=sorted(CLUSTERS), help="configs to render")
    p.add_argument("--check", action="store_true", help="only report stale manifests")
    p.add_argument("--image", default=IMAGE, help=f"container image (default {IMAGE})")
    args = p.parse_args(argv)
    stale = []
    for name in args.names:
        if name not in CLUSTERS:
            p.error(f"unknown config {name!r}: add it to CLUSTERS in kuberay/render.py")
        text, path = render(name, args.image), OUT_DIR / f"{name}.yaml"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(os.path.relpath(path, ROOT))
        else:
            path.write_text(text)
            print(f"wrote {os.path.relpath(path, ROOT)}")
    if stale:
        print("stale (run python kuberay/render.py): " + ", ".join(stale), file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
