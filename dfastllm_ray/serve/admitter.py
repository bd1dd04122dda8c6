"""The ingress side of the batcher's admission: places leased in blocks, requests admitted here.

The batcher leases each ingress replica a grant of the model's places (`lease_book.py`). A
request that finds a free place in the grant is admitted at once, with no call; one that finds
it full waits, with every request that arrives meanwhile, for one call that asks for them all
and renews the grant. Between calls a heartbeat every `HEARTBEAT_S` reports what this ingress
holds (the batcher resizes the grant to it, and forgets an ingress that stops calling). While a
call is out nothing is admitted locally: the call's report must stay true until its answer.
The admitted requests then stream from a model replica directly, not through the batcher.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import suppress
from contextvars import Context
from typing import Awaitable, Callable, Optional

from .errors import unavailable
from .lease_book import HEARTBEAT_S
from .records import AdmitCall, AdmitVerdict

log = logging.getLogger("ray.serve.dfastllm")
ADMIT_TIMEOUT_S = 10.0   # past it, a call's waiters get 503 model_unavailable (the batcher is stuck)


class Admitter:
    def __init__(self, send: Callable[[AdmitCall], Awaitable[AdmitVerdict]]) -> None:
        self._send = send
        self.ingress_id = uuid.uuid4().hex     # this ingress replica, for this model
        self.held = 0                          # admitted requests not yet ended
        self.grant = 0                         # places leased to this ingress now
        self.limit: Optional[int] = None       # the global cap, from the last verdict
        self.calls = 0                         # calls answered by the batcher
        self._waiting: list[asyncio.Future] = []
        self._calling = False
        self._arrived = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    async def acquire(self) -> bool:
        """True: admitted (call `release` when the request ends); False: the model is full."""
        if not self._waiting and not self._calling and self.held < self.grant:
            self.held += 1
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._arrived.set()
        if self._task is None or self._task.done():
            # its own context: the calls carry no request's id (they serve many requests)
            self._task = asyncio.get_running_loop().create_task(self._run(), context=Context())
        try:
            return await fut
        except asyncio.CancelledError:   # cancelled after its place was granted: give it back
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result():
                self.release()
            raise

    def release(self) -> None:
        self.held -= 1

    async def _run(self) -> None:
        """Calls the batcher while requests wait, and heartbeats while a grant is held."""
        try:
            while self._waiting or self.grant or self.held:
                if not self._waiting:
                    await self._idle()
                await self._call()
        except Exception as exc:      # never leave a waiter hanging
            log.error("admission by the batcher failed: %r", exc)
            self._fail(exc)

    async def _idle(self) -> None:
        """Until a request waits or the heartbeat is due."""
        due = time.monotonic() + HEARTBEAT_S
        while not self._waiting and time.monotonic() < due:
            self._arrived.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), due - time.monotonic())

    async def _call(self) -> None:
        batch = [f for f in self._waiting if not f.done()]   # a cancelled waiter asks nothing
        self._waiting = []
        self._calling = True
        try:
            verdict = await asyncio.wait_for(
                self._send(AdmitCall(self.ingress_id, self.held, len(batch))), ADMIT_TIMEOUT_S)
        except asyncio.TimeoutError:  # a bounded wait: the waiters are refused, not held
            self._fail_all(batch, unavailable(f"The model's batcher did not answer within "
                                              f"{ADMIT_TIMEOUT_S:g} s; retry shortly."))
            return
        except Exception as exc:      # the batcher is unreachable: each waiter gets the error
            self._fail_all(batch, exc)
            return                    # the grant stands; the next heartbeat reports again
        finally:
            self._calling = False
        self.calls += 1
        self.grant, self.limit = verdict.grant, verdict.limit
        for i, fut in enumerate(batch):
            if not fut.done():           # a waiter that left keeps no place
                fut.set_result(i < verdict.admitted)
                self.held += i < verdict.admitted

    def _fail(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, []
        self._fail_all(waiting, exc)

    @staticmethod
    def _fail_all(futures: list[asyncio.Future], exc: BaseException) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)
