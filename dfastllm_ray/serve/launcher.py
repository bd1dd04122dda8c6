"""`python -m dfastllm_ray.serve run CONFIG`: `serve run` with a graceful drain on SIGTERM.

`serve run` exits on SIGTERM at once (Ray's driver handler calls `sys.exit`, and the local
cluster goes with it): open streams are cut without `[DONE]` and admitted requests get nothing.
This launcher deploys the same Serve config the same way (`ServeDeploySchema`, `serve_start`,
`deploy_apps`) and on SIGTERM or SIGINT:

1. tells every ingress replica to drain: readiness turns 503 ("draining") and new requests get
   503 + Retry-After (on a new local cluster the proxy gate refuses them from the signal on:
   the handler creates the gate's drain file, `arm_drain_file`);
2. lets admitted requests, streamed or not, finish for up to the graceful timeout (the config's
   largest `graceful_shutdown_timeout_s`, or `--graceful-timeout-s`); requests still open then
   get a 503 or an in-band error event and `[DONE]`;
3. shuts Serve and Ray down and exits 0 with one log line, no traceback.

On a new local cluster it also installs the proxy gate (`proxy_gate.py`): Serve's proxy refuses
generation requests past the apps' admission caps itself, without routing them to the ingress.
`DFASTLLM_PROXY_MAX_INFLIGHT=0` in the environment turns it off.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

log = logging.getLogger("dfastllm_ray.serve.launcher")
DEFAULT_GRACE_S = 20.0            # Serve's own default graceful_shutdown_timeout_s


def graceful_timeout(config: dict[str, Any]) -> float:
    """The largest `graceful_shutdown_timeout_s` set anywhere in the config's applications."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "graceful_shutdown_timeout_s" and isinstance(value, (int, float)):
                    found.append(float(value))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(config.get("applications", []))
    return max(found) if found else DEFAULT_GRACE_S


APP_IMPORT_PATH = "dfastllm_ray.serve.app:build_app"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


def proxy_gate_caps(config: dict[str, Any]) -> dict[str, int]:
    """The proxy gate's per-model caps for a Serve config: each model's admission limit, summed
    over this project's apps that serve it (empty: none of its apps). Also what
    kuberay/render.py puts in the pods' env."""
    from .app import proxy_model_caps
    caps: dict[str, int] = {}
    for app in config.get("applications", []):
        if app.get("import_path") == APP_IMPORT_PATH:
            for model, cap in proxy_model_caps(app.get("args") or {}).items():
                caps[model] = caps.get(model, 0) + cap
    return caps


def proxy_gate_cap(config: dict[str, Any]) -> int:
    """The proxy gate's total cap: the sum of every model's (0: none of this project's apps)."""
    return sum(proxy_gate_caps(config).values())


def proxy_gate_env(config: dict[str, Any]) -> dict[str, str]:
    """The env that installs the gate at the config's caps (empty: no app of this project)."""
    from .proxy_gate import CALLBACK, CALLBACK_ENV, MAX_INFLIGHT_ENV, MODEL_CAPS_ENV
    caps = proxy_gate_caps(config)
    if not caps:
        return {}
    return {CALLBACK_ENV: CALLBACK, MAX_INFLIGHT_ENV: str(sum(caps.values())),
            MODEL_CAPS_ENV: json.dumps(caps, separators=(",", ":"))}


def install_proxy_gate(config: dict[str, Any]) -> Optional[int]:
    """Set the env that Serve's proxy reads at start (inherited by the new cluster's
    processes) to install the gate, capped at this project's apps' admission limits (in all
    and per model); returns the total cap, or None when there is no such app or another
    callback is set. The config's `controller_options.runtime_env.env_vars` (which would
    override the process env in the proxy) is rewritten to the same values: an explicit env
    (0: off) wins, else the caps computed from the apps as they are (a copy of a config with a
    model dropped must not keep the file's larger caps)."""
    from .proxy_gate import CALLBACK, CALLBACK_ENV, MAX_INFLIGHT_ENV, MODEL_CAPS_ENV
    from .proxy_gate import max_inflight_from_env
    file_env = ((config.get("controller_options") or {}).get("runtime_env") or {}).get("env_vars")
    if os.environ.get(CALLBACK_ENV, CALLBACK) != CALLBACK:
        log.warning("%s is set to another callback: no proxy gate", CALLBACK_ENV)
        for name in (CALLBACK_ENV, MAX_INFLIGHT_ENV, MODEL_CAPS_ENV):
            (file_env or {}).pop(name, None)
        return None
    env = proxy_gate_env(config)
    if not env:
        return None
    for name, value in env.items():
        os.environ.setdefault(name, value)           # an explicit value (0: off) wins
    os.environ[CALLBACK_ENV] = CALLBACK
    if file_env is not None:
        file_env.update({name: os.environ[name] for name in env})
    return max_inflight_from_env()


def deploy(config: dict[str, Any], address: Optional[str]) -> None:
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema
    # before the schema: it may rewrite controller_options (a cluster whose Serve already runs
    # keeps its proxy; the env and the controller's options apply to a new one)
    from .proxy_gate import MODEL_CAPS_ENV
    cap = install_proxy_gate(config)
    log.info("proxy gate: %s", f"on, at most {cap} generation requests admitted at once "
             f"({os.environ.get(MODEL_CAPS_ENV)} per model); beyond: 503 + Retry-After"
             if cap else "off")
    schema = ServeDeploySchema.model_validate(config)
    ray.init(address=address, namespace="serve")
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location,
                                   grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                   controller_options=schema.controller_options)
    client.deploy_apps(schema, _blocking=False)


def warm_handles(app_names: list[str], handles: dict[str, Any]) -> None:
    """Get and warm (one `ping`) the ingress handle of every app that is running and has none
    yet. A handle's first call waits for Serve to send it the replica list (measured: a few
    requests sent right after SIGTERM were still admitted while the drain call waited for it);
    a warm handle routes the drain at once."""
    from ray import serve
    for name in app_names:
        if name in handles:
            continue
        try:
            if serve.status().applications[name].status != "RUNNING":
                continue
            handle = serve.get_app_handle(name)
            handle.ping.remote().result(timeout_s=10)
        except Exception as exc:    # not deployed yet, or mid-update: tried again next second
            log.debug("app %s: handle not warm yet (%r)", name, exc)
            continue
        handles[name] = handle
        log.info("app %s: ingress handle warm, a drain is routed at once", name)


def drain_all(app_names: list[str], timeout_s: float, handles: dict[str, Any],
              calls: int = 4) -> list[dict]:
    """Drain every ingress replica: several concurrent calls per app reach every replica that
    Serve's router balances over (a draining replica answers a second call the same way)."""
    from ray import serve
    results = []
    for name in app_names:
        try:
            handle = handles.get(name) or serve.get_app_handle(name)
        except Exception as exc:   # the app never deployed: nothing to drain
            log.warning("app %s: %r", name, exc)
            continue
        pending = [handle.drain.remote(timeout_s) for _ in range(calls)]
        for resp in pending:
            try:
                results.append(resp.result(timeout_s=timeout_s + 10))
            except Exception as exc:
                log.warning("drain of %s failed: %r", name, exc)
    return results


def first_deploy_failure(app_names: list[str], ran: set[str]) -> Optional[str]:
    """Why an app's first deploy failed (its build raised, or its replicas failed to start past
    Serve's retries: a missing checkpoint folder, no GPU), or None. Apps seen RUNNING are added
    to `ran`; a later failure of theirs is a replica loss that Serve recovers from, not this."""
    from ray import serve
    try:
        apps = serve.status().applications
    except Exception as exc:      # the controller is busy or restarting: asked again next second
        log.debug("serve.status(): %r", exc)
        return None
    for name in app_names:
        app = apps.get(name)
        if app is None:
            continue
        if app.status == "RUNNING":
            ran.add(name)
        elif app.status == "DEPLOY_FAILED" and name not in ran:
            why = [f"  {dep}: {last_exception(d.message)}" for dep, d in app.deployments.items()
                   if d.status == "DEPLOY_FAILED" and d.message]
            return "\n".join([f"application {name!r} failed to deploy: "
                              f"{last_exception(app.message)}", *why,
                              "(the tracebacks are in the controller's log above)"])
    return None


def last_exception(message: str) -> str:
    """The last `SomeError: text` line of a Serve status message (a replica's traceback), or
    its first line: what a person acts on."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if EXCEPTION_LINE.match(ln)]
    return errors[-1] if errors else (lines[0] if lines else "")


def arm_drain_file() -> Path:
    """The proxy gate's drain file (`proxy_gate.DRAIN_FILE_ENV`, in the env that the new
    cluster's processes inherit): not created yet; the signal handler creates it, and from then
    the proxy admits no new generation request. Its folder is removed at exit."""
    from .proxy_gate import DRAIN_FILE_ENV
    path = Path(tempfile.mkdtemp(prefix="dfastllm-drain-")) / "draining"
    os.environ[DRAIN_FILE_ENV] = str(path)
    return path


def on_signal(stop: threading.Event, drain_file: Path) -> Any:
    def handler(*_: Any) -> None:
        drain_file.touch()           # first: the proxy refuses from now on
        stop.set()
    return handler


def run(path: str, address: Optional[str], grace_s: Optional[float]) -> int:
    config = yaml.safe_load(Path(path).read_text())
    grace = grace_s if grace_s is not None else graceful_timeout(config)
    stop = threading.Event()
    drain_file = arm_drain_file()     # before ray.init: the proxy inherits the env
    try:
        deploy(config, address)
        for sig in (signal.SIGTERM, signal.SIGINT):      # after ray.init, which sets its own
            signal.signal(sig, on_signal(stop, drain_file))
        log.info("deployed %s; SIGTERM drains for up to %g s", path, grace)
        names = [app["name"] for app in config.get("applications", [])]
        handles: dict[str, Any] = {}
        ran: set[str] = set()
        failure = None
        while failure is None and not stop.wait(1.0):
            if len(ran) < len(names):
                failure = first_deploy_failure(names, ran)
            if len(handles) < len(names):
                warm_handles(names, handles)
        t0 = time.monotonic()
        results = [] if failure else drain_all(names, grace, handles)
        shutdown_serve()
    finally:
        shutil.rmtree(drain_file.parent, ignore_errors=True)
    if failure:
        log.error("%s\nstopped: fix the config and run it again", failure)
        return 1
    cut = sum(r.get("cut", 0) for r in {r.get("replica"): r for r in results}.values())
    log.info("stopped in %.1f s (%d requests cut past the %g s grace)",
             time.monotonic() - t0, cut, grace)
    return 0


def shutdown_serve() -> None:
    from ray import serve
    import ray
    serve.shutdown()
    ray.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfastllm_ray.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="deploy a Serve config; SIGTERM drains, then exits")
    r.add_argument("config", help="a Serve config file, e.g. configs/tiny.yaml")
    r.add_argument("--address", default="local",
                   help="Ray address: 'local' (a new cluster, the default), 'auto', or host:port")
    r.add_argument("--graceful-timeout-s", type=float, default=None,
                   help="how long admitted requests may run after SIGTERM (default: the "
                        "config's largest graceful_shutdown_timeout_s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    problem = config_problem(args.config)
    if problem:
        log.error("%s: %s", args.config, problem)
        return 2
    return run(args.config, args.address, args.graceful_timeout_s)


def config_problem(path: str) -> Optional[str]:
    """What is wrong with a Serve config file, checked before any cluster starts (None: it
    reads, matches Serve's schema, and this project's apps' `args` validate)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema
    from .config_errors import ConfigError, format_validation_error, unknown_keys
    try:
        config = yaml.safe_load(Path(path).read_text())
        ServeDeploySchema.model_validate(config)
    except (OSError, yaml.YAMLError) as exc:
        return f"cannot read it: {exc}"
    except ValidationError as exc:
        return "\n" + format_validation_error(exc, ServeDeploySchema, config, top="config")
    unknown = unknown_keys(ServeDeploySchema, config)
    if unknown:
        return "\n" + "\n".join(unknown)
    for app in config.get("applications", []):
        try:
            proxy_gate_caps({"applications": [app]})    # validates this project's apps' args
        except ConfigError as exc:
            return f"application {app.get('name')!r} args:\n{exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
