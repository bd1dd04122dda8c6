"""Successful health and admission calls (ping, card, stats, admit) leave no access-log line;
everything else does."""
from __future__ import annotations

import logging

import pytest

from dfastllm_ray.serve.quiet_logs import (NoServeAccessLog, QuietHealthCalls, own_access_log,
                                           quiet_health_calls)


def record(msg: str, access: bool = True) -> logging.LogRecord:
    rec = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, msg, None, None)
    if access:
        rec.serve_access_log = True
    return rec


@pytest.mark.parametrize("msg,kept", [
    ("CALL ping OK 0.4ms", False), ("CALL card OK 1.0ms", False),
    ("127.0.0.1 CALL stats OK 2.2ms", False), ("CALL admit OK 5.3ms", False),
    ("CALL admit ERROR 3.0ms", True),
    ("CALL ping ERROR 2001.0ms", True), ("CALL generate OK 812.5ms", True),
    ("GET /health/ready 200 1.1ms", True),
])
def test_only_successful_health_calls_are_dropped(msg, kept):
    assert QuietHealthCalls().filter(record(msg)) is kept


def test_other_records_pass_and_install_is_idempotent():
    assert QuietHealthCalls().filter(record("CALL ping OK 0.4ms", access=False))
    logger = logging.getLogger("ray.serve")
    before = list(logger.filters)
    try:
        quiet_health_calls()
        quiet_health_calls()
        own_access_log()
        assert sum(isinstance(f, QuietHealthCalls) for f in logger.filters) == 1
        assert sum(isinstance(f, NoServeAccessLog) for f in logger.filters) == 1
    finally:
        logger.filters[:] = before


def test_the_ingress_drops_serve_access_lines_only():
    assert not NoServeAccessLog().filter(record("POST /v1/completions 200 100.5ms"))
    assert NoServeAccessLog().filter(record("POST /v1/completions 200 100.5ms", access=False))
