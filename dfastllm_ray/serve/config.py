"""The builder's arguments: what `args:` in `configs/*.yaml` may hold, validated at start.

Every model is one `ModelConfig` (the shape of Ray Serve LLM's `LLMConfig`: `model_id`,
`model_source`, engine settings, deployment options). Unknown fields are rejected with their name
(`extra="forbid"`), so a typo in a YAML file fails `serve run` instead of being ignored.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import dfastllm_ray

from .config_errors import check_keys, validate

DEFAULT_ENGINE_FACTORY = "dfastllm_ray.serve.replica:build_engine"


def shipped_tiny_model() -> str:
    """The tiny LLaDA-format checkpoint inside the installed package: no download needed."""
    return str(Path(dfastllm_ray.__file__).resolve().parent / "assets" / "tiny-llada")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _ray_schema(value: Optional[dict[str, Any]], schema: type[BaseModel]) -> None:
    """Check a mapping handed to Ray as is against Ray's own schema, keys included (Ray's
    `AutoscalingConfig` and actor-options schema keep or drop a misspelt key without a word:
    `max_replica: 4` would deploy one replica)."""
    if value is not None:
        check_keys(value, schema.model_fields, "")
        validate(schema, value, top="")


class DeploymentOptions(_Strict):
    """Ray Serve `@serve.deployment` options; unset ones keep Serve's defaults."""
    num_replicas: Optional[Union[Annotated[int, Field(ge=1)], Literal["auto"]]] = None
    autoscaling_config: Optional[dict[str, Any]] = None   # min/max_replicas, target_ongoing_requests...
    max_ongoing_requests: Optional[int] = Field(None, ge=1)
    max_queued_requests: Optional[int] = Field(None, ge=-1)   # beyond it: BackPressureError -> 503
    ray_actor_options: Optional[dict[str, Any]] = None   # num_cpus, num_gpus, accelerator_type, memory
    health_check_period_s: Optional[float] = Field(None, gt=0)
    health_check_timeout_s: Optional[float] = Field(None, gt=0)
    graceful_shutdown_wait_loop_s: Optional[float] = Field(None, ge=0)
    graceful_shutdown_timeout_s: Optional[float] = Field(None, ge=0)   # drain in-flight requests

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        from ray.serve.config import AutoscalingConfig
        _ray_schema(v, AutoscalingConfig)
        return v

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        from ray.serve.schema import RayActorOptionsSchema
        _ray_schema(v, RayActorOptionsSchema)
        return v

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if isinstance(self.num_replicas, int) and self.autoscaling_config:
            raise ValueError("num_replicas and autoscaling_config are exclusive: set one "
                             "(or num_replicas: auto)")
        return self

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _replica_defaults() -> DeploymentOptions:
    # The engine batches at step level, so a replica takes many requests at once; the queue in
    # front of it is bounded so overload is a fast 503, not a hang.
    return DeploymentOptions(max_ongoing_requests=64, max_queued_requests=256,
                             health_check_period_s=10, health_check_timeout_s=30,
                             graceful_shutdown_timeout_s=60)


def _onto(defaults: Any) -> Any:
    """A `mode="before"` validator: a `deployment:` block given in the YAML is laid over the
    defaults field by field (`deployment: {num_replicas: 2}` keeps max_ongoing_requests 64 and
    the rest; without this it would get Serve's default of 5 requests per replica). A field
    set to null gets Serve's own default."""
    def merge(v: Any) -> Any:
        return {**defaults().model_dump(exclude_none=True), **v} if isinstance(v, dict) else v
    return merge


def _batcher_defaults() -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=512, max_queued_requests=1024,
                             ray_actor_options={"num_cpus": 0})


class BatcherConfig(_Strict):
    """`@serve.batch` settings, applied live through `user_config` (no restart)."""
    max_batch_size: int = Field(16, ge=1)            # admission calls answered together
    batch_wait_timeout_s: float = Field(0.005, ge=0)  # paid by a request whose grant is full
    deployment: DeploymentOptions = Field(default_factory=_batcher_defaults)
    _merge_deployment = field_validator("deployment", mode="before")(_onto(_batcher_defaults))
    # Measurement only (benchmarks/reliability.py --direct): the ingress sends requests to the
    # replicas without asking the batcher (no global cap, no alignment; it stays deployed for
    # stats and pings).
    bypass: bool = False

    def user_config(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s}


class VerifierConfig(_Strict):
    """The causal LM (Qwen2 layout, the drafter's tokenizer) that hybrid diffusion-AR requests
    (`decoding: apd | speculative`, docs/hybrid.md) verify with, held in the same replica and on
    the same device as the model."""
    model_source: str = Field(min_length=1)          # folder or hub id "org/name"
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = None   # None: the engine's


class ModelConfig(_Strict):
    """One served model: its name in the API, where its weights are, and how it is deployed."""
    model_id: str = Field(min_length=1)              # the `model` field clients send
    model_source: str = Field(default_factory=shipped_tiny_model)   # folder or hub id "org/name"
    verifier: Optional[VerifierConfig] = None        # enables decoding "apd" / "speculative"
    engine: dict[str, Any] = Field(default_factory=dict)   # EngineConfig fields (dtype, device...)
    sampling_defaults: dict[str, Any] = Field(default_factory=dict)   # SamplingParams fields
    max_tokens_limit: Optional[int] = Field(None, ge=1)   # cap on max_tokens (None: the context)
    engine_factory: str = DEFAULT_ENGINE_FACTORY     # "module:function" (tests inject their own)
    metrics_interval_s: float = Field(2.0, gt=0)     # engine stats -> gauges
    # Engine requests (choices) of this model admitted at once per ingress replica; beyond it a
    # request is refused with 503 + Retry-After at once. None: 2 x max_num_seqs x max replicas
    # (every decoding slot busy, plus as many queued in the engines).
    max_inflight: Optional[int] = Field(None, ge=1)
    deployment: DeploymentOptions = Field(default_factory=_replica_defaults)
    batcher: BatcherConfig = Field(default_factory=BatcherConfig)
    _merge_deployment = field_validator("deployment", mode="before")(_onto(_replica_defaults))

    @field_validator("engine_factory")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if v.count(":") != 1:
            raise ValueError(f"engine_factory={v!r} must look like 'package.module:function'")
        return v

    def admission_limit(self, max_num_seqs: int) -> int:
        """`max_inflight`, or its default from the engine's slots and the most replicas."""
        if self.max_inflight is not None:
            return self.max_inflight
        scaling = self.deployment.autoscaling_config or {}
        replicas = scaling.get("max_replicas") or (
            self.deployment.num_replicas if isinstance(self.deployment.num_replicas, int) else 1)
        return 2 * max_num_seqs * int(replicas)

    def deployment_suffix(self) -> str:
        """The model id made safe for a Serve deployment name."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.model_id)


class RateLimitConfig(_Strict):
    """Token bucket per client (API key, else client address), per ingress replica."""
    requests_per_second: float = Field(gt=0)
    burst: int = Field(10, ge=1)


def _ingress_defaults() -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=512, max_queued_requests=1024,
                             ray_actor_options={"num_cpus": 0})


class ServerSettings(_Strict):
    """What the HTTP ingress enforces before a request reaches any model."""
    api_keys: list[str] = Field(default_factory=list)   # empty + no env keys: auth off
    api_keys_env: Optional[str] = "DFASTLLM_API_KEYS"   # comma-separated keys, read at replica start
    api_keys_required: bool = False     # no key found at the ingress's start: fail it, not auth off
    rate_limit: Optional[RateLimitConfig] = None
    request_timeout_s: float = Field(300.0, gt=0)       # aborts the request in the engine
    max_concurrent_requests: int = Field(256, ge=1)     # per ingress replica; beyond: 503
    health_poll_s: float = Field(1.0, gt=0)             # replica readiness refresh
    health_timeout_s: float = Field(2.0, gt=0)          # a ping unanswered this long, with no
                                                        # block streamed meanwhile: model down
    unavailable_wait_s: float = Field(2.0, ge=0)        # a new request waits this long for a
                                                        # model that is down, then 503
    model_wait_s: float = Field(30.0, ge=0)             # a request waits this long for a loading model
    max_n: int = Field(8, ge=1)                         # largest `n` (choices per request)


class AppArgs(ServerSettings):
    """The full `args:` mapping of a Serve application built by `build_app`."""
    models: list[ModelConfig] = Field(min_length=1)
    ingress: DeploymentOptions = Field(default_factory=_ingress_defaults)
    _merge_ingress = field_validator("ingress", mode="before")(_onto(_ingress_defaults))

    @classmethod
    def parse(cls, args: Union["AppArgs", Any]) -> "AppArgs":
        """`args` validated, or `ConfigError` listing each bad field by its YAML path."""
        return args if isinstance(args, cls) else validate(cls, args)

    @model_validator(mode="after")
    def _unique_ids(self) -> "AppArgs":
        ids = [m.model_id for m in self.models]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"models: model_id must be unique, repeated: {dup}")
        return self

    def server_settings(self) -> ServerSettings:
        return ServerSettings(**{k: getattr(self, k) for k in ServerSettings.model_fields})
