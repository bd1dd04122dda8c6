"""Relaying a streamed Serve call, and cancelling it when the consumer goes away early."""
from __future__ import annotations

from typing import Any, AsyncIterator


async def relay(resp: Any) -> AsyncIterator[Any]:
    """Yield a DeploymentResponseGenerator's outputs; if the consumer stops before the final one
    (client disconnect, timeout), cancel the downstream call so the replica aborts the request."""
    done = False
    try:
        async for out in resp:
            done = out.finished
            yield out
    finally:
        if not done:
            resp.cancel()
