"""The batcher's count of admitted engine requests, over every ingress replica of a model.

An ingress replica does not tell the batcher about each request that ends: it reports how many
it holds with its next call (`AdmitCall.holding`, see `admitter.py`), and at least every
`HEARTBEAT_S` while it holds any. So the book keeps one number per ingress replica, replaced by
each report and raised by what the batcher admits; an ingress that stops reporting (its process
died) is forgotten after `TTL_S`, and its places come back. Between reports an ended request
still counts, so the cap errs on the side of refusing a little early, never of admitting past it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from .records import AdmitCall

HEARTBEAT_S = 2.0     # an ingress holding requests reports at least this often
TTL_S = 10.0          # an ingress silent this long is forgotten (5 missed heartbeats)


@dataclass
class _Holding:
    count: int
    seen: float       # monotonic time of the last report


class LeaseBook:
    def __init__(self, limit: Optional[int], clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit                      # None: no global cap
        self._clock = clock
        self._held: dict[str, _Holding] = {}
        self.shed = 0                           # asks refused

    def total(self) -> int:
        """Admitted engine requests held now, over every live ingress replica."""
        self._expire()
        return sum(h.count for h in self._held.values())

    def admit(self, call: AdmitCall) -> int:
        """Take the call's report, then admit what fits under the cap: the number of its asks
        that may go (the first ones, in the order the ingress queued them)."""
        now = self._clock()
        held = self._held.setdefault(call.ingress_id, _Holding(0, now))
        held.count, held.seen = max(0, call.holding), now
        free = call.asks if self.limit is None else max(0, self.limit - self.total())
        admitted = min(call.asks, free)
        held.count += admitted
        self.shed += call.asks - admitted
        if held.count == 0:
            del self._held[call.ingress_id]      # nothing held: nothing to expire later
        return admitted

    def ingresses(self) -> int:
        self._expire()
        return len(self._held)

    def _expire(self) -> None:
        cutoff = self._clock() - TTL_S
        for key in [k for k, h in self._held.items() if h.seen < cutoff]:
            del self._held[key]
