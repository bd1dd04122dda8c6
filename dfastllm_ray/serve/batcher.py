"""The batcher: `@serve.batch` admits each model's arrivals together, over every ingress replica.

The engine batches at step level (requests join and leave between forwards), so the batcher's
job is to align arrivals: admission calls that land within `batch_wait_timeout_s` of each other
are answered in one batch, so their requests are let go together and reach the engine before
its next step, instead of trickling in one per step. It is also where every ingress replica's
traffic for the model meets, so it enforces the model's capacity globally
(`ModelConfig.max_inflight`, counted in `lease_book.py`): past it the asks are refused, and the
ingress answers 503 + Retry-After (each ingress replica sheds the same limit locally first).

The tokens do not pass through here. An ingress replica sends one small `AdmitCall` per burst
of its requests (`admitter.py`); the admitted requests then stream from the model replicas
directly, and the ingress reports what it still holds with its next call. Relaying every
request's stream through this hop cost ~10 ms of CPU per request (docs/serving.md).
`max_batch_size` (admission calls per batch) and `batch_wait_timeout_s` come from `user_config`
and change live through `reconfigure` (no restart).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from ray import serve

from .lease_book import LeaseBook
from .priority import restore_priority
from .quiet_logs import quiet_health_calls
from .records import AdmitCall, AdmitVerdict

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005


@serve.deployment
class Batcher:
    def __init__(self, limit: Optional[int] = None) -> None:
        restore_priority("batcher")
        quiet_health_calls()
        self._book = LeaseBook(limit)                  # engine requests in flight, all ingresses
        self._sizes: Counter[int] = Counter()          # requests per batch -> count, for stats
        self._settings = {"max_batch_size": DEFAULT_MAX_BATCH_SIZE,
                          "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_S}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        size = int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        wait = float(user_config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S))
        self.admit.set_max_batch_size(size)
        self.admit.set_batch_wait_timeout_s(wait)
        self._settings = {"max_batch_size": size, "batch_wait_timeout_s": wait}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def admit(self, calls: list[AdmitCall]) -> list[AdmitVerdict]:
        """Each call's report is taken and its asks admitted in arrival order; every caller of
        the batch gets its verdict in the same loop iteration."""
        asks = sum(c.asks for c in calls)
        if asks:
            self._sizes[asks] += 1
        return [AdmitVerdict(self._book.admit(c), self._book.limit) for c in calls]

    def ping(self) -> None:
        """Readiness: the batcher answers (the ingress pings it beside the replicas)."""

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": dict(sorted(self._sizes.items())), "inflight": self._book.total(),
                "limit": self._book.limit, "shed": self._book.shed,
                "ingresses": self._book.ingresses(), **self._settings}
