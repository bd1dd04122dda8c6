"""Request guards run before any model work: Bearer API keys and a per-client rate limit.

Keys are compared with `hmac.compare_digest` against every configured key (no early exit), so the
response time does not reveal how much of a guessed key was right. The rate limit is a token
bucket per client; it lives in the ingress replica, so with N ingress replicas a client may get up
to N times the configured rate (documented in docs/serving.md).
"""
from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from typing import Callable, Optional

from .errors import APIError, rate_limited


def load_api_keys(keys: list[str], env_var: Optional[str], required: bool = False) -> list[str]:
    """Keys from the config plus the comma-separated environment variable (read at replica start,
    so a Kubernetes secret mounted as env reaches the ingress without touching the YAML).
    `required` (`api_keys_required`): no key at all is an error, not a server that is open to
    everyone because a secret was not mounted."""
    out = [k for k in keys if k]
    if env_var:
        out += [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    if required and not out:
        where = f"the environment variable {env_var} is unset or empty in the ingress replica" \
            if env_var else "api_keys_env is null"
        raise ValueError(f"api_keys_required=true, but api_keys is empty and {where}. Set "
                         f"{env_var or 'api_keys_env'} (comma-separated keys; on Kubernetes from "
                         "a secret) or api_keys, or set api_keys_required: false to serve "
                         "without keys")
    return out


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def count(self) -> int:
        return len(self._keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: Optional[str]) -> str:
        """Return the client's key, or raise 401. Disabled (no keys): everyone passes as ""."""
        if not self._keys:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        given = token.strip().encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return token.strip()


class RateLimiter:
    """Token buckets keyed by client; idle clients are evicted past `max_clients` (LRU)."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, t)

    def acquire(self, client: str) -> None:
        """Take one token for `client`, or raise 429 with the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            raise rate_limited((1.0 - tokens) / self.rate)
        self._buckets[client] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
