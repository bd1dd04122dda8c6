"""`AsyncEngine`: the `Engine` behind an asyncio API, stepping in a background thread.

The event loop never runs a model forward: `generate()` hands its request to the step thread
through a command queue and then awaits outputs, which the step thread posts back with
`call_soon_threadsafe` each time one of the request's blocks commits. Only the step thread
touches the `Engine`, so the engine itself needs no locks.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable

from ..sampling.params import SamplingParams
from .engine import Engine
from .outputs import RequestOutput

IDLE_WAIT_S = 0.05     # step thread's sleep between checks when nothing is running


class EngineDeadError(RuntimeError):
    """The step loop stopped (an exception in a step, or shutdown())."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._stats: dict = engine.stats()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="dfastllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str, dtype: str = "auto", device: str = "auto", **config) -> "AsyncEngine":
        return cls(Engine.from_model(model, dtype=dtype, device=device, **config))

    # ---- the asyncio side ------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one RequestOutput per committed block; the last has finished=True. Leaving the
        iteration early (break, cancellation) aborts the request and frees its pages."""
        self.check_health()
        rid = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), stream)
        added: Future = Future()
        self._submit(lambda: self._add(rid, prompt, params, added))
        finished = False
        try:
            await asyncio.wrap_future(added)
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._submit(lambda: self.engine.abort(rid))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason "abort"."""
        self._submit(lambda: self._post(self.engine.abort(request_id)))

    def stats(self) -> dict:
        """The snapshot taken after the latest step (never waits for a step)."""
        return {**self._stats, "num_streams": len(self._streams), "healthy": self._error is None}

    def check_health(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine step loop is not running: {self._error!r}")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop; open streams end with EngineDeadError."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._fail_streams(EngineDeadError("the engine was shut down"))

    # ---- the step thread -------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _add(self, rid: str, prompt: str | list[int], params, added: Future) -> None:
        try:      # tokenized here: only the step thread touches the tokenizer
            ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.engine.add_request(rid, ids, params)
        except Exception as exc:          # a bad request fails its caller, not the loop
            added.set_exception(exc)
        else:
            added.set_result(None)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()               # before draining: a later submit re-sets it
                if self._drain_commands():
                    self._stats = self.engine.stats()
                if not self.engine.has_unfinished():
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()     # before posting: a finished stream sees it
                for out in outputs:
                    self._post(out)
        except BaseException as exc:      # keep the loop's failure for check_health and streams
            self._error = exc
            self._fail_streams(EngineDeadError(f"engine step failed: {exc!r}"))

    def _drain_commands(self) -> int:
        done = 0
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return done
            command()
            done += 1

    def _post(self, out: RequestOutput | None) -> None:
        if out is None:
            return
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)

    def _fail_streams(self, exc: BaseException) -> None:
        for loop, stream in list(self._streams.values()):
            if not loop.is_closed():
                loop.call_soon_threadsafe(stream.put_nowait, exc)
