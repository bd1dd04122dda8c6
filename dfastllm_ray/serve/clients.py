"""How the ingress reaches a model: the `ModelClient` protocol and its two implementations.

`HandleClient` goes through Ray Serve (admission by the batcher, blocks from a replica);
`LocalClient` calls a `ReplicaCore` in the same process, so the HTTP layer is tested in
milliseconds without Ray (the same `OpenAIServer` and routes run in both cases).
Closing a `generate` stream early (client gone, timeout) cancels the downstream call, and the
replica aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional, Protocol

from .admitter import Admitter
from .records import BlockOutput, GenerateRequest, ModelCard
from .streams import relay


class ModelClient(Protocol):
    async def card(self) -> ModelCard: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def ping(self) -> None: ...   # raises when the model cannot serve


class HandleClient:
    """Ray Serve handles: each generation is admitted by the batcher (one call per burst,
    `admitter.py`), then streamed from a model replica directly."""

    def __init__(self, batcher: Any, replica: Any, bypass: bool = False) -> None:
        # Configured handles are created once: each .options() call makes a new handle with its
        # own long-poll and metrics pusher (RAY_SERVE.md, pitfall 17). `bypass` (measurement
        # only) sends requests without asking the batcher.
        self._stream = replica.options(stream=True)
        self._batcher = batcher
        self._replica = replica
        self.admitter = None if bypass else Admitter(batcher.admit.remote)

    async def card(self) -> ModelCard:
        return await self._replica.card.remote()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]:
        if self.admitter is not None and not await self.admitter.acquire():
            yield at_capacity_record(req.request_id, self.admitter.limit)
            return
        try:
            async for out in relay(self._stream.generate.remote(req)):
                yield out
        finally:
            if self.admitter is not None:
                self.admitter.release()

    async def stats(self) -> dict[str, Any]:
        """One replica's engine stats (a call reaches one replica), one batcher's counts and
        this ingress's lease (its grant, the requests it holds, its calls to the batcher)."""
        out = await self._replica.stats.remote()
        out = {**out, "batcher": await self._batcher.stats.remote()}
        if self.admitter is not None:
            adm = self.admitter
            out["lease"] = {"grant": adm.grant, "held": adm.held, "calls": adm.calls}
        return out

    async def ping(self) -> None:
        await asyncio.gather(self._batcher.ping.remote(), self._replica.ping.remote())


def at_capacity_record(request_id: str, limit: Optional[int]) -> BlockOutput:
    """The batcher refused the request: a refusal record (the server answers 503 + Retry-After,
    as for the ingress's own refusals)."""
    return BlockOutput(request_id, "", 0, 0, finished=True, finish_reason="error",
                       error=f"The model is at capacity ({limit} requests); retry shortly.",
                       error_status=503)


class LocalClient:
    """A `ReplicaCore` in this process (tests, or embedding the API without Ray)."""

    def __init__(self, core: Any) -> None:
        self._core = core

    async def card(self) -> ModelCard:
        return self._core.card()

    def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]:
        return self._core.generate(req)

    async def stats(self) -> dict[str, Any]:
        return self._core.stats()

    async def ping(self) -> None:
        await self._core.check_health()
