"""Keep the ingress's health and admission traffic out of the replicas' access logs.

The ingress pings every model's batcher and replicas each `health_poll_s` (and reads a card or
stats now and then): Serve writes an access-log line per call (`CALL ping OK 0.4ms`), about 4
lines a second on the tiny config, streamed to the `serve run` console and written to every
replica's log file, burying the lines that matter. The batcher's `admit` calls (a heartbeat
every 2 s per ingress replica, and a call when a grant runs out: `admitter.py`) serve many
requests each and say nothing about one. Successful calls of these methods are dropped here;
failed ones (`ERROR`), and every generation call, are still logged.

In the ingress, Serve's access line for each HTTP request (`POST /v1/completions 200 100.5ms`)
repeats the ingress's own (`api.py`), which says more: the model, and 499 for a client that
left mid-response where Serve says 200. There Serve's lines are dropped altogether.
"""
from __future__ import annotations

import logging
import re

QUIET_CALLS = re.compile(r"(^|\s)CALL (ping|card|stats|admit) OK \d")   # after a client address, if any
SERVE_LOGGER = "ray.serve"


class QuietHealthCalls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "serve_access_log", False):
            return True
        return not QUIET_CALLS.search(record.getMessage())


class NoServeAccessLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "serve_access_log", False)


def quiet_health_calls() -> None:
    """Install `QuietHealthCalls` on Serve's logger in this replica's process (once)."""
    _install(QuietHealthCalls)


def own_access_log() -> None:
    """Install `NoServeAccessLog` in the ingress's process (once): its own lines replace them."""
    _install(NoServeAccessLog)


def _install(kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())
