"""The batcher's book of the model's capacity, leased out to the ingress replicas.

Asking the batcher for every request still cost it 4 ms of CPU per request (a Serve call each;
docs/serving.md), so places are leased in blocks: each ingress replica holds a grant (how
many engine requests it may have admitted at once) and admits locally within it; it calls the
batcher only when a request finds its grant full, and on a heartbeat every `HEARTBEAT_S`
(`admitter.py`). Each call reports what the ingress holds; its grant becomes what it holds and
asks for plus a spare share of the free places (`spare`), never more than the cap leaves after
every other live ingress's grant, so the grants together never pass the cap. An ingress that
stops calling (its process died) is forgotten after `TTL_S`, and its places come back.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .records import AdmitCall, AdmitVerdict

HEARTBEAT_S = 2.0     # an ingress with a grant calls at least this often
TTL_S = 10.0          # an ingress silent this long is forgotten (5 missed heartbeats)
UNCAPPED = 1 << 30    # the grant of an ingress when the model has no cap


@dataclass
class _Lease:
    grant: int
    seen: float       # monotonic time of the last call


class LeaseBook:
    def __init__(self, limit: Optional[int], clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit                      # None: no global cap
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self.shed = 0                           # asks refused

    def spare(self, live: int) -> int:
        """Places an ingress may hold beyond what it holds and asks for: half of its even
        share of the cap, so one busy ingress calls about once per that many admissions, and
        an idle one keeps a few places ready without starving the others."""
        return max(1, math.ceil(self.limit / (2 * max(1, live))))

    def call(self, call: AdmitCall) -> AdmitVerdict:
        """Take the call's report, admit what fits (the first of its asks, in the order the
        ingress queued them) and set its new grant."""
        if self.limit is None:
            return AdmitVerdict(call.asks, UNCAPPED, None)
        now = self._clock()
        self._expire(now)
        lease = self._leases.pop(call.ingress_id, None) or _Lease(0, now)
        room = self.limit - sum(other.grant for other in self._leases.values())
        want = call.holding + call.asks + self.spare(len(self._leases) + 1)
        lease.grant, lease.seen = max(0, min(room, want)), now
        admitted = max(0, min(call.asks, lease.grant - call.holding))
        self.shed += call.asks - admitted
        self._leases[call.ingress_id] = lease
        return AdmitVerdict(admitted, lease.grant, self.limit)

    def granted(self) -> int:
        """Places leased out now, over every live ingress replica (at most the cap)."""
        self._expire(self._clock())
        return sum(lease.grant for lease in self._leases.values())

    def ingresses(self) -> int:
        self._expire(self._clock())
        return len(self._leases)

    def _expire(self, now: float) -> None:
        for key in [k for k, v in self._leases.items() if v.seen < now - TTL_S]:
            del self._leases[key]
