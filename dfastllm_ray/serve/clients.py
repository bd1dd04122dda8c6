"""How the ingress reaches a model: the `ModelClient` protocol and its two implementations.

`HandleClient` goes through Ray Serve (ingress -> batcher -> replica deployment handles);
`LocalClient` calls a `ReplicaCore` in the same process, so the HTTP layer is tested in
milliseconds without Ray (the same `OpenAIServer` and routes run in both cases).
Closing a `generate` stream early (client gone, timeout) cancels the downstream call, and the
replica aborts the request in the engine.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Protocol

from .records import BlockOutput, GenerateRequest, ModelCard
from .streams import relay


class ModelClient(Protocol):
    async def card(self) -> ModelCard: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def ping(self) -> None: ...   # raises when the model cannot serve


class HandleClient:
    """Ray Serve handles: generation through the batcher, the rest straight to a replica."""

    def __init__(self, batcher: Any, replica: Any, bypass: bool = False) -> None:
        # Configured handles are created once: each .options() call makes a new handle with its
        # own long-poll and metrics pusher (RAY_SERVE.md, pitfall 17). `bypass` (measurement
        # only) streams from the replicas directly.
        self._batcher_stream = (replica if bypass else batcher).options(stream=True)
        self._batcher = batcher
        self._replica = replica

    async def card(self) -> ModelCard:
        return await self._replica.card.remote()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]:
        async for out in relay(self._batcher_stream.generate.remote(req)):
            yield out

    async def stats(self) -> dict[str, Any]:
        """One replica's engine stats (a call reaches one replica) and one batcher's counts."""
        out = await self._replica.stats.remote()
        return {**out, "batcher": await self._batcher.stats.remote()}

    async def ping(self) -> None:
        await asyncio.gather(self._batcher.ping.remote(), self._replica.ping.remote())


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
