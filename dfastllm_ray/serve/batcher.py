"""The batcher: the model's capacity over every ingress replica, leased out with `@serve.batch`.

Every ingress replica's traffic for a model meets here, so this is where the model's cap
(`ModelConfig.max_inflight`) holds globally: the batcher leases each ingress replica a grant of
places (`lease_book.py`), the ingress admits requests locally within it and calls for more only
when it is full (`admitter.py`); past the cap the asks are refused and the ingress answers 503 +
Retry-After (each ingress replica sheds the same limit locally first). `@serve.batch` answers
the calls that land within `batch_wait_timeout_s` of each other together, so the requests they
carry are let go in one burst.

The tokens do not pass through here: admitted requests stream from the model replicas to the
ingress directly. Relaying every request's stream through this hop cost the batcher 9-14 ms of
CPU per request, a call per request still 4 ms; leased, it spends what its health pings do
(docs/serving.md, `benchmarks/serve_cpu.py`). `max_batch_size`
(calls per batch) and `batch_wait_timeout_s` come from `user_config` and change live through
`reconfigure` (no restart).
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
        self._book = LeaseBook(limit)                  # the model's places, leased to ingresses
        self._sizes: Counter[int] = Counter()          # asks per batch -> count, for stats
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
        return [self._book.call(c) for c in calls]

    def ping(self) -> None:
        """Readiness: the batcher answers (the ingress pings it beside the replicas)."""

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": dict(sorted(self._sizes.items())), "granted": self._book.granted(),
                "limit": self._book.limit, "shed": self._book.shed,
                "ingresses": self._book.ingresses(), **self._settings}
