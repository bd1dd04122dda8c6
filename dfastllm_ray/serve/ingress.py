"""The ingress deployment: the FastAPI app of `api.py` in a Serve replica.

The app is built after the constructor (`__serve_build_asgi_app__`, Serve's late-bound ingress),
so its routes close over this replica's `OpenAIServer`, guards and metrics instead of reaching
for globals. API keys are read here, at replica start, from the config and the environment.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ray import serve

from .api import build_api
from .clients import HandleClient
from .config import ServerSettings
from .guards import ApiKeys, RateLimiter, load_api_keys
from .metrics import IngressMetrics
from .priority import restore_priority
from .quiet_logs import own_access_log
from .server import OpenAIServer

log = logging.getLogger("ray.serve.dfastllm")


@serve.deployment
@serve.ingress()
class OpenAIIngress:
    def __init__(self, settings: ServerSettings, models: dict[str, tuple[Any, Any, bool]],
                 limits: Optional[dict[str, int]] = None) -> None:
        restore_priority("ingress")
        own_access_log()
        clients = {model: HandleClient(batcher, replica, bypass)
                   for model, (batcher, replica, bypass) in models.items()}
        self.server = OpenAIServer(settings, clients, limits)
        metrics = IngressMetrics()
        self.server.on_first_block = metrics.first_block
        keys = ApiKeys(load_api_keys(settings.api_keys, settings.api_keys_env,
                                     settings.api_keys_required))
        log.info("auth: %s", f"on ({keys.count} API keys)" if keys.enabled else
                 f"off (no api_keys, and {settings.api_keys_env or 'no api_keys_env'} "
                 "is unset or empty)")
        limiter = None
        if settings.rate_limit is not None:
            limiter = RateLimiter(settings.rate_limit.requests_per_second, settings.rate_limit.burst)
        # Serve's proxy already adds x-request-id to every response.
        self._app = build_api(self.server, keys, limiter, metrics, add_request_id_header=False)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    async def ping(self) -> bool:
        """A no-op call: the launcher warms its handle with it, so that on SIGTERM its drain
        call is routed at once (a handle's first call waits for the replica list)."""
        return True

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Called by the launcher on SIGTERM (`python -m dfastllm_ray.serve run`)."""
        import ray
        out = await self.server.drain(timeout_s)
        return {**out, "replica": ray.get_runtime_context().get_actor_name()}
