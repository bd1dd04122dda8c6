"""Merge the block streams of a request's choices, under one deadline.

Each choice's stream is pumped by its own task into one queue, so the consumer waits on a queue
(`asyncio.wait_for(queue.get())`) rather than cancelling a generator mid-step on timeout.
`close()` cancels the pumps; cancelling a pump closes its stream, which cancels the downstream
Serve call, which makes the replica abort the request in the engine (client gone, timeout).
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional

from .records import BlockOutput

_END = object()


class DeadlineExceeded(Exception):
    pass


class Fanin:
    def __init__(self, streams: list[AsyncIterator[BlockOutput]], timeout_s: float,
                 model: str = "") -> None:
        self.model = model                       # the model the streams come from
        self.deadline = time.monotonic() + timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index: int, stream: AsyncIterator[BlockOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:   # delivered to the consumer, which maps it to an HTTP error
            self._queue.put_nowait((index, exc))
        finally:
            self._queue.put_nowait((index, _END))

    async def next(self) -> Optional[tuple[int, BlockOutput]]:
        """The next block of any choice; None once every choice has finished."""
        while self._open:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded
            try:
                index, item = await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:
                raise DeadlineExceeded from None
            if item is _END:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            return index, item
        return None

    def fail(self, exc: BaseException) -> None:
        """Make the consumer's next `next()` raise `exc` (the model lost its replica)."""
        self._queue.put_nowait((-1, exc))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # Wait so the downstream cancellations are sent before the response completes.
        await asyncio.gather(*self._tasks, return_exceptions=True)
