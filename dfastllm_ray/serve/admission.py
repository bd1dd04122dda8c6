"""Load shedding at the ingress: refuse early and cheaply, so the engine stays full but the
Serve path (proxy, ingress, batcher, replica queues) never fills with requests that can only wait.

Each model admits at most `limit` engine requests (choices) per ingress replica: its replicas'
decoding slots plus an equal queue in the engines, by default. Past it a request is refused
with 503 + Retry-After before it is tokenized or sent anywhere; Retry-After is the recent mean
latency of a finished request (a slot frees about that often per admitted request), so
well-behaved clients come back when they have a chance. While draining (SIGTERM, `drain()`),
nothing new is admitted and the ingress waits for the admitted requests to finish.
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Optional

from .errors import APIError, overloaded

EWMA_WEIGHT = 0.1            # weight of the newest request latency in the running mean
MAX_RETRY_AFTER_S = 10
DRAINING = "The server is shutting down; retry on another replica."
TOO_MANY = "Too many requests in flight; retry shortly."


def retry_after_s(latency_s: float) -> int:
    """About one request latency, jittered (0.5x to 1.5x) so refused clients do not all come
    back in the same second; whole seconds in [1, MAX_RETRY_AFTER_S] (RFC 9110)."""
    wait = latency_s * random.uniform(0.5, 1.5)
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait)))


def at_capacity(model: str, limit: int) -> str:
    """The refusal's message for a full model (the proxy gate uses it too: a client cannot tell
    which gate refused)."""
    return f"Model {model!r} is at capacity ({limit} requests admitted); retry shortly."


class Admission:
    def __init__(self, limits: dict[str, Optional[int]], max_total: int) -> None:
        self.limits = limits                          # model -> engine requests; None: no cap
        self.max_total = max_total                    # HTTP requests in flight, all models
        self.inflight: dict[str, int] = {m: 0 for m in limits}   # engine requests per model
        self.requests = 0                             # HTTP requests in flight
        # generations let through the front gate whose body (and model) is not parsed yet
        self.pending = 0
        self.latency_s = 1.0                          # EWMA of finished requests' latency
        self.refused = 0
        self.refusal_s: deque[float] = deque(maxlen=4096)   # ingress-side time of each 429/503
        self.draining = False

    def refusal_p99_ms(self) -> Optional[float]:
        """p99 of the time refusals spent in this ingress (arrival -> response start)."""
        if not self.refusal_s:
            return None
        xs = sorted(self.refusal_s)
        return round(1000 * xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))], 2)

    def retry_after(self) -> int:
        return retry_after_s(self.latency_s)

    def front(self) -> Optional[APIError]:
        """The gate at the very front of a generation request, before any await (the body is
        not received yet): the refusal while draining or while the requests already let in
        fill every capped model, else a pending place that `settle` gives back once the
        request's model is known. Counting the pending places is what stops a burst: 200
        arrivals all pass a gate that only counts admitted requests, since none is admitted
        until its body has come in."""
        refusal = self.saturated()
        if refusal is None:
            self.pending += 1
        return refusal

    def settle(self) -> None:
        self.pending -= 1

    def saturated(self) -> Optional[APIError]:
        """The refusal for any generation request while draining, or while the admitted and
        pending requests fill the free places of every capped model (a pending request may be
        for any model, so with several models this refuses a burst a little early; the
        per-model check after parsing is exact)."""
        if self.draining:
            return self._refuse(DRAINING)
        if self.requests + self.pending >= self.max_total:
            return self._refuse(TOO_MANY)
        capped = [m for m, limit in self.limits.items() if limit is not None]
        if not capped or len(capped) < len(self.limits):
            return None
        free = sum(max(0, self.limits[m] - self.inflight.get(m, 0)) for m in capped)
        if free > self.pending:
            return None
        if len(capped) == 1:
            return self._refuse(at_capacity(capped[0], self.limits[capped[0]]))
        return self._refuse("Every model is at capacity; retry shortly.")

    def _refuse(self, message: str) -> APIError:
        self.refused += 1
        return overloaded(message, retry_after_s=self.retry_after())

    def check(self, model: Optional[str] = None) -> None:
        """Before any work: refuse while draining or full (503 + Retry-After)."""
        if self.draining:
            raise self._refuse(DRAINING)
        if self.requests >= self.max_total:
            raise self._refuse(TOO_MANY)
        self.check_model(model)

    def check_model(self, model: Optional[str], more: int = 0) -> None:
        """The model's own cap; `more` > 0: would `more` extra engine requests still fit?"""
        limit = self.limits.get(model) if model else None
        if limit is not None and self.inflight.get(model, 0) + more >= limit + (more > 0):
            raise self._refuse(at_capacity(model, limit))

    def enter(self, model: str, choices: int) -> None:
        self.inflight[model] = self.inflight.get(model, 0) + choices

    def leave(self, model: str, choices: int, latency_s: Optional[float]) -> None:
        self.inflight[model] -= choices
        if self.inflight[model] <= 0 and model not in self.limits:
            del self.inflight[model]          # an unknown model (404): keep no entry
        if latency_s is not None:
            self.latency_s += EWMA_WEIGHT * (latency_s - self.latency_s)
