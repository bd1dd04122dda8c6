"""The batcher: `@serve.batch` gathers arrivals and hands them to the model replicas together.

The engine batches at step level (requests join and leave between forwards), so the batcher's
job is to align arrivals: requests that land within `batch_wait_timeout_s` of each other are
dispatched in one burst and reach the engine before its next step, instead of trickling in one
per step. Each request keeps its own downstream stream, so closing one (client gone, timeout)
aborts only that request. `max_batch_size` and `batch_wait_timeout_s` come from `user_config`
and change live through `reconfigure` (no restart).

The batched method returns at once (it only marks the batch), so one batch never waits for
another's generation to finish; Serve's `max_concurrent_batches` of 1 is then harmless.

The batcher is also where every ingress replica's traffic for the model meets, so it enforces
the model's capacity globally (`ModelConfig.max_inflight`): past it a request is refused at once
with a 503 record, before it reaches a replica's queue (each ingress replica sheds the same
limit locally first). docs/serving.md gives the measured cost of this hop.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, AsyncIterator, Optional

from ray import serve
from ray.exceptions import RayActorError

from .priority import restore_priority
from .quiet_logs import quiet_health_calls
from .records import BlockOutput, GenerateRequest
from .streams import relay

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005


@serve.deployment
class Batcher:
    def __init__(self, replica: Any, limit: Optional[int] = None) -> None:
        restore_priority("batcher")
        quiet_health_calls()
        self._replica = replica.options(stream=True)   # created once (RAY_SERVE.md pitfall 17)
        self._limit = limit                            # engine requests in flight, all ingresses
        self._inflight, self._shed = 0, 0
        self._sizes: Counter[int] = Counter()          # batch size -> count, for /v1/engine/stats
        self._settings = {"max_batch_size": DEFAULT_MAX_BATCH_SIZE,
                          "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_S}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        size = int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        wait = float(user_config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S))
        self._gather.set_max_batch_size(size)
        self._gather.set_batch_wait_timeout_s(wait)
        self._settings = {"max_batch_size": size, "batch_wait_timeout_s": wait}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _gather(self, reqs: list[GenerateRequest]) -> list[int]:
        """Completes when a batch has formed; every waiter of the batch wakes in the same loop
        iteration and dispatches at once."""
        self._sizes[len(reqs)] += 1
        return [len(reqs)] * len(reqs)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]:
        # The one place all ingress replicas' traffic for this model meets: shed past the
        # model's capacity here (a record, not an exception: Serve logs raised ones as errors).
        if self._limit is not None and self._inflight >= self._limit:
            self._shed += 1
            yield BlockOutput(req.request_id, "", 0, 0, finished=True, finish_reason="error",
                              error=f"The model is at capacity ({self._limit} requests); "
                              "retry shortly.", error_status=503, error_code="overloaded")
            return
        self._inflight += 1
        try:
            # A plain async generator around the batched call: Serve cannot stream a
            # @serve.batch generator through handle.options(stream=True) (RAY_SERVE.md pitfall 3).
            await self._gather(req)
            # Dispatched here, not inside the batch task, so the call carries this request's
            # Serve context: the same request id in the replica's logs, and cancellation.
            async for out in relay(self._replica.generate.remote(req)):
                yield out
        except RayActorError as exc:     # the replica died: a record, so Serve logs no
            yield BlockOutput(req.request_id, "", 0, 0, finished=True,   # traceback here
                              finish_reason="error", error=f"replica lost: {type(exc).__name__}",
                              error_status=503, error_code="model_unavailable")
        finally:
            self._inflight -= 1

    def ping(self) -> None:
        """Readiness: the batcher answers (the ingress pings it beside the replicas)."""

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": dict(sorted(self._sizes.items())), "inflight": self._inflight,
                "limit": self._limit, "shed": self._shed, **self._settings}
