"""The ingress side of the batcher's admission: one small call per burst of requests.

A request of a model first asks the batcher for a place (`acquire`), then streams from a model
replica directly, and gives the place back when it ends (`release`). Asking is coalesced: while
one call to the batcher is out, the requests that arrive wait together and go in the next call,
so under load there is one call per burst, not per request, and each burst's admitted requests
are let go in the same loop iteration (they reach the engine at the same step). Releases are not
calls of their own: the held count rides on the next call, or on a report `REPORT_DELAY_S` after
the last release when no request comes, and on a heartbeat every `HEARTBEAT_S` while any is held
(the batcher forgets a silent ingress after `lease_book.TTL_S`).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import suppress
from typing import Awaitable, Callable, Optional

from .lease_book import HEARTBEAT_S
from .records import AdmitCall, AdmitVerdict

log = logging.getLogger("ray.serve.dfastllm")
REPORT_DELAY_S = 0.1     # ended requests are reported this long after the first of them


class Admitter:
    def __init__(self, send: Callable[[AdmitCall], Awaitable[AdmitVerdict]]) -> None:
        self._send = send
        self.ingress_id = uuid.uuid4().hex     # this ingress replica, for this model
        self.held = 0                          # admitted requests not yet ended
        self.limit: Optional[int] = None       # the global cap, from the last verdict
        self.calls = 0                         # calls made to the batcher
        self._reported = 0                     # what the batcher counts for this ingress
        self._waiting: list[asyncio.Future] = []
        self._changed = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    async def acquire(self) -> bool:
        """True: admitted (call `release` when the request ends); False: the model is full."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._kick()
        try:
            return await fut
        except asyncio.CancelledError:   # cancelled after its place was granted: give it back
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result():
                self.release()
            raise

    def release(self) -> None:
        self.held -= 1
        self._kick()

    def _kick(self) -> None:
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Calls the batcher until nothing is waiting, held or left to report."""
        try:
            while self._waiting or self.held or self._reported:
                if not self._waiting:
                    await self._idle()
                await self._call()
        except Exception as exc:      # never leave a waiter hanging
            log.error("admission to the batcher failed: %r", exc)
            self._fail(exc)

    async def _idle(self) -> None:
        """Until a request arrives or a report is due: `REPORT_DELAY_S` after a release that the
        batcher has not heard of, `HEARTBEAT_S` otherwise."""
        start = time.monotonic()
        while not self._waiting:
            due = REPORT_DELAY_S if self.held != self._reported else HEARTBEAT_S
            left = start + due - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def _call(self) -> None:
        batch = [f for f in self._waiting if not f.done()]   # a cancelled waiter asks nothing
        self._waiting = []
        holding = self.held
        try:
            verdict = await self._send(AdmitCall(self.ingress_id, holding, len(batch)))
        except Exception as exc:      # the batcher is unreachable: each waiter gets the error
            for fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            self._reported = self.held   # not retried at once; the heartbeat tries again
            return
        self.calls += 1
        self.limit = verdict.limit
        for i, fut in enumerate(batch):
            if not fut.done():           # a waiter that left keeps no place
                fut.set_result(i < verdict.admitted)
                self.held += i < verdict.admitted
        self._reported = holding + verdict.admitted

    def _fail(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
