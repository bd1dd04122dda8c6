"""`ModelHealth`: can each model serve right now? Readiness, and failing fast when it cannot.

A watcher pings every model's batcher and replicas every `health_poll_s`. A model is *down*
when a ping fails (the replica actor died, its engine loop stopped) or times out while none of
its requests made progress (a dead replica's calls hang in Serve's router until the controller
notices, ~`health_check_period_s` later; a busy replica still streams blocks). A generation call
that fails with a replica-loss error fails with 503 and makes the watcher probe at once: with
several replicas, the others keep the model up; with none left, the probe marks it down.

While a model is down: `/health/ready` answers 503, every open request of that model is failed
with 503 + Retry-After (streams get an in-band error event), and a new request waits at most
`unavailable_wait_s` for the model to come back before its 503. The first successful ping
brings the model back: Serve restarts the replica, the app is never restarted.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from .errors import unavailable

log = logging.getLogger("ray.serve.dfastllm")
SUSPECT_TIMEOUT_S = 1.0       # ping timeout right after a request lost its replica


class ModelHealth:
    def __init__(self, models: list[str], poll_s: float, timeout_s: float,
                 wait_s: float) -> None:
        self.poll_s, self.timeout_s, self.wait_s = poll_s, timeout_s, wait_s
        self.healthy: dict[str, bool] = {m: False for m in models}
        self.down: set[str] = set()                  # failed after its card was known
        self._up = {m: asyncio.Event() for m in models}
        self._progress: dict[str, float] = {m: 0.0 for m in models}   # monotonic s of last block
        self._open: dict[str, set[Any]] = {m: set() for m in models}  # open Fanins per model
        self._kick = asyncio.Event()                 # probe now (a replica-loss error was seen)
        self._suspect = False                        # the next probe follows a replica loss
        self.suspected = 0

    # ---- what requests report --------------------------------------------------------------
    def progress(self, model: str) -> None:
        self._progress[model] = time.monotonic()

    def opened(self, model: str, fan: Any) -> None:
        self._open[model].add(fan)

    def closed(self, model: str, fan: Any) -> None:
        self._open[model].discard(fan)

    def suspect(self, model: str, why: str) -> None:
        """A request of `model` lost its replica: probe every model now, not at the next poll."""
        log.info("model %s: a request lost its replica (%s); probing", model, why)
        self.suspected += 1
        self._suspect = True
        self._kick.set()

    async def pause(self) -> None:
        """The watcher's wait between probes; ends early when a replica loss is suspected."""
        try:
            await asyncio.wait_for(self._kick.wait(), self.next_poll_s())
        except asyncio.TimeoutError:
            self._suspect = False            # a full poll interval without a new suspicion
        self._kick.clear()

    def mark_down(self, model: str, why: str) -> None:
        if model not in self.down:
            log.warning("model %s cannot serve: %s", model, why)
        self.down.add(model)
        self.healthy[model] = False
        self._up[model].clear()
        err = self.lost(model)
        for fan in list(self._open[model]):
            fan.fail(err)

    def mark_up(self, model: str) -> None:
        if model in self.down:
            log.info("model %s serves again", model)
        self.down.discard(model)
        self.healthy[model] = True
        self._up[model].set()

    def lost(self, model: str) -> Exception:
        return unavailable(f"Model {model!r} lost its replica mid-request; retry shortly.")

    def fail_all(self, exc: Exception) -> None:
        """Fail every open request of every model with `exc` (shutdown past its grace)."""
        for fans in self._open.values():
            for fan in list(fans):
                fan.fail(exc)

    async def admit(self, model: str) -> None:
        """A new request for a model that is down waits (bounded) for it, then gets 503."""
        if model not in self.down:
            return
        try:
            await asyncio.wait_for(self._up[model].wait(), self.wait_s)
        except asyncio.TimeoutError:
            raise unavailable(f"Model {model!r} has no replica that can serve; retry "
                              "shortly.") from None

    # ---- the watcher -----------------------------------------------------------------------
    async def probe(self, model: str, ping: Callable[[], Any], known: bool) -> None:
        """One ping. `known`: the model's card was fetched (it has loaded once), so a failure
        means it went down rather than that it is still loading."""
        t0 = time.monotonic()
        # a suspected loss is probed with a short timeout: a live replica answers in ms
        timeout = min(self.timeout_s, SUSPECT_TIMEOUT_S) if self._suspect else self.timeout_s
        try:
            await asyncio.wait_for(ping(), timeout)
        except asyncio.TimeoutError:
            if self._progress[model] >= t0:
                return            # blocks streamed during the ping: busy, not dead
            if known:
                self.mark_down(model, f"no answer to a ping within {timeout:g} s")
            return
        except BackPressureError:
            return                # the queue in front of the replica is full: alive
        except Exception as exc:
            self._fail(model, known, exc)
            return
        self.mark_up(model)

    def _fail(self, model: str, known: bool, exc: BaseException) -> None:
        if known:
            self.mark_down(model, repr(exc))
        else:
            self.healthy[model] = False

    def ready(self) -> bool:
        return all(self.healthy.values())

    def next_poll_s(self) -> float:
        """Poll fast until every model is up, so readiness follows loading closely."""
        return self.poll_s if self.ready() else min(self.poll_s, 0.5)


def is_replica_loss(exc: BaseException) -> bool:
    """Errors meaning "no replica could run this", never "this request was wrong": the actor
    died or is unreachable, the deployment has no replica, the engine loop stopped."""
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return True
    # the replica's engine loop died (engine/async_engine.py); matched by name so the ingress
    # does not import the engine (and torch)
    return type(exc).__name__ in ("EngineDeadError", "WorkerCrashedError", "NodeDiedError")
