"""`build_app(args)`: the Serve application, reached from YAML by
`import_path: dfastllm_ray.serve.app:build_app`.

The graph: one `OpenAIIngress` (FastAPI, OpenAI routes) -> per model a `Batcher`
(`@serve.batch`: leases the model's cap to the ingress replicas) and that model's `ModelReplica`s (one
`AsyncEngine` each, autoscaled), which stream the admitted requests' blocks to the ingress.
Deployment names carry the model id (`Batcher:<id>` style, see docs/serving.md) so a YAML
`deployments:` override can target one model's replicas.
"""
from __future__ import annotations

import logging
from typing import Any, Union

from ray.serve import Application

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.sampling.defaults import generation_defaults
from dfastllm_ray.sampling.params import SamplingParams

from .batcher import Batcher
from .config import AppArgs, ModelConfig
from .config_errors import ConfigError, check_keys, dataclass_fields
from .ingress import OpenAIIngress
from .replica import ModelReplica

log = logging.getLogger("ray.serve.dfastllm")
SERVE_DEFAULT_MAX_ONGOING = 5      # what Serve applies when max_ongoing_requests is null


def check_model(cfg: ModelConfig) -> None:
    """Fail at start, naming the field, for settings only the engine layer can judge."""
    path = f"models[{cfg.model_id}]"
    check_keys(cfg.engine, dataclass_fields(EngineConfig), f"{path}.engine")
    check_keys(cfg.sampling_defaults, dataclass_fields(SamplingParams), f"{path}.sampling_defaults")
    try:
        EngineConfig(**cfg.engine)
    except ValueError as exc:     # "EngineConfig.<field>=<value> is invalid: <fix>"
        raise ConfigError(f"{path}.engine.{str(exc).removeprefix('EngineConfig.')}") from None
    try:
        generation_defaults({}, cfg.sampling_defaults)
    except ValueError as exc:     # "<field>=<value> is invalid: <rule>"
        raise ConfigError(f"{path}.sampling_defaults.{exc}") from None
    warn_idle_slots(cfg, EngineConfig(**cfg.engine).max_num_seqs)
    decoding = cfg.sampling_defaults.get("decoding", "diffusion")
    if cfg.verifier is None and decoding != "diffusion":
        raise ConfigError(f"models[{cfg.model_id}].sampling_defaults: decoding={decoding!r} "
                         "needs a verifier: set models[].verifier.model_source (a causal LM "
                         "over the same tokenizer), or leave decoding out")


def warn_idle_slots(cfg: ModelConfig, max_num_seqs: int) -> None:
    """Each engine request is one call to a replica, so a replica's `max_ongoing_requests`
    below the engine's `max_num_seqs` leaves decoding slots that no request can ever fill:
    allowed (a deliberate cap), but said."""
    ongoing = cfg.deployment.max_ongoing_requests or SERVE_DEFAULT_MAX_ONGOING
    if ongoing < max_num_seqs:
        log.warning("models[%s].deployment.max_ongoing_requests=%d is below "
                    "engine.max_num_seqs=%d: a replica never holds more than %d requests, so %d "
                    "of its decoding slots stay idle; set max_ongoing_requests >= %d (the engine "
                    "queues what it cannot decode yet)", cfg.model_id, ongoing, max_num_seqs,
                    ongoing, max_num_seqs - ongoing, max_num_seqs)


def model_deployments(cfg: ModelConfig, limit: int) -> tuple[Application, Application]:
    suffix = cfg.deployment_suffix()
    replica = ModelReplica.options(name=f"ModelReplica-{suffix}",
                                   **cfg.deployment.serve_options()).bind(cfg)
    batcher = Batcher.options(name=f"Batcher-{suffix}", user_config=cfg.batcher.user_config(),
                              **cfg.batcher.deployment.serve_options()).bind(limit)
    return batcher, replica


def proxy_model_caps(args: Union[AppArgs, dict[str, Any]]) -> dict[str, int]:
    """The proxy gate's caps for this app (`proxy_gate.py`): each model's admission limit."""
    cfg = AppArgs.parse(args)
    caps = {}
    for model in cfg.models:
        check_model(model)
        caps[model.model_id] = model.admission_limit(EngineConfig(**model.engine).max_num_seqs)
    return caps


def build_app(args: Union[AppArgs, dict[str, Any]]) -> Application:
    cfg = AppArgs.parse(args)
    limits = proxy_model_caps(cfg)
    models = {m.model_id: (*model_deployments(m, limits[m.model_id]), m.batcher.bypass)
              for m in cfg.models}
    ingress = OpenAIIngress.options(**cfg.ingress.serve_options())
    return ingress.bind(cfg.server_settings(), models, limits)
