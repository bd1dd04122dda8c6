"""`build_app(args)`: the Serve application, reached from YAML by
`import_path: dfastllm_ray.serve.app:build_app`.

The graph: one `OpenAIIngress` (FastAPI, OpenAI routes) -> per model a `Batcher`
(`@serve.batch`) -> that model's `ModelReplica`s (one `AsyncEngine` each, autoscaled).
Deployment names carry the model id (`Batcher:<id>` style, see docs/serving.md) so a YAML
`deployments:` override can target one model's replicas.
"""
from __future__ import annotations

from typing import Any, Union

from ray.serve import Application

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.sampling.defaults import generation_defaults

from .batcher import Batcher
from .config import AppArgs, ModelConfig
from .ingress import OpenAIIngress
from .replica import ModelReplica


def check_model(cfg: ModelConfig) -> None:
    """Fail at start, naming the field, for settings only the engine layer can judge."""
    try:
        EngineConfig(**cfg.engine)
    except (TypeError, ValueError) as exc:   # TypeError: an unknown EngineConfig field
        raise ValueError(f"models[{cfg.model_id}].engine: {exc}") from None
    try:
        generation_defaults({}, cfg.sampling_defaults)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"models[{cfg.model_id}].sampling_defaults: {exc}") from None
    decoding = cfg.sampling_defaults.get("decoding", "diffusion")
    if cfg.verifier is None and decoding != "diffusion":
        raise ValueError(f"models[{cfg.model_id}].sampling_defaults: decoding={decoding!r} "
                         "needs a verifier: set models[].verifier.model_source (a causal LM "
                         "over the same tokenizer), or leave decoding out")


def model_deployments(cfg: ModelConfig, limit: int) -> tuple[Application, Application]:
    suffix = cfg.deployment_suffix()
    replica = ModelReplica.options(name=f"ModelReplica-{suffix}",
                                   **cfg.deployment.serve_options()).bind(cfg)
    batcher = Batcher.options(name=f"Batcher-{suffix}", user_config=cfg.batcher.user_config(),
                              **cfg.batcher.deployment.serve_options()).bind(replica, limit)
    return batcher, replica


def proxy_model_caps(args: Union[AppArgs, dict[str, Any]]) -> dict[str, int]:
    """The proxy gate's caps for this app (`proxy_gate.py`): each model's admission limit."""
    cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    return {m.model_id: m.admission_limit(EngineConfig(**m.engine).max_num_seqs)
            for m in cfg.models}


def build_app(args: Union[AppArgs, dict[str, Any]]) -> Application:
    cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    models, limits = {}, {}
    for model in cfg.models:
        check_model(model)
        limits[model.model_id] = model.admission_limit(EngineConfig(**model.engine).max_num_seqs)
        models[model.model_id] = (*model_deployments(model, limits[model.model_id]),
                                  model.batcher.bypass)
    ingress = OpenAIIngress.options(**cfg.ingress.serve_options())
    return ingress.bind(cfg.server_settings(), models, limits)
