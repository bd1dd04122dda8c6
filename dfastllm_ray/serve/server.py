"""`OpenAIServer`: the OpenAI semantics of the ingress, free of FastAPI and Ray.

Order of work for a generation request: model lookup (404) -> prompt and knobs validated against
the model card (400, at once) -> one `GenerateRequest` per choice -> blocks merged under the
request deadline (504 and an engine abort past it) -> a full body or SSE chunks.
Readiness comes from a background watcher (`health.py`), so `/health` answers from memory in
microseconds even when every replica is busy decoding, and a model that lost its replicas fails
its requests with 503 + Retry-After instead of holding them.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Union

from ray.serve.exceptions import BackPressureError

from . import prompts
from .admission import Admission
from .clients import ModelClient
from .config import ServerSettings
from .errors import APIError, from_value_error, model_not_found, overloaded, timed_out
from .fanin import DeadlineExceeded, Fanin
from .health import ModelHealth, is_replica_loss
from .protocol import ChatCompletionRequest, CompletionRequest
from .records import BlockOutput, GenerateRequest, ModelCard
from .responses import DONE, Choice, ResponseMeta, block_chunk, full_response, sse, usage_chunk

log = logging.getLogger("ray.serve.dfastllm")
TOKENIZE_INLINE_CHARS = 20_000   # longer prompts are tokenized in a worker thread


@dataclass
class Prepared:
    """A validated generation request, ready to send."""
    meta: ResponseMeta
    requests: list[GenerateRequest]     # one per choice, in choice order
    stream: bool
    include_usage: bool
    n: int = 1                          # choices per prompt: requests[i] is prompt i // n's
    t0: float = field(default_factory=time.perf_counter)   # arrival, for time to first block

    def choices(self) -> list[Choice]:
        """One running Choice per request; a prompt's tokens count once in the usage however
        many choices it has (OpenAI's and vLLM's `prompt_tokens` with n > 1)."""
        return [Choice(i, len(r.prompt_token_ids) if i % self.n == 0 else 0)
                for i, r in enumerate(self.requests)]


def root_cause(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception in `RayTaskError` once per hop, with the remote traceback
    in its text; the original exception (and its message for the client) is `.cause`."""
    seen = 0
    while getattr(exc, "cause", None) is not None and exc.cause is not exc and seen < 8:
        exc, seen = exc.cause, seen + 1
    return exc


def map_downstream_error(exc: BaseException) -> APIError:
    """Errors raised by the batcher/replica -> the client's error (never a remote traceback)."""
    exc = root_cause(exc)
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return overloaded("The model's queue is full; retry shortly.")
    if isinstance(exc, TimeoutError):   # the replica's own deadline (the ingress's normally wins)
        return timed_out(0.0)
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    log.error("generation failed: %r", exc)
    return APIError(500, f"The model failed to generate: {type(exc).__name__}", code="internal_error")


class OpenAIServer:
    def __init__(self, settings: ServerSettings, clients: dict[str, ModelClient],
                 limits: Optional[dict[str, Optional[int]]] = None) -> None:
        self.settings = settings
        self.clients = clients
        self.cards: dict[str, ModelCard] = {}
        self.health = ModelHealth(list(clients), settings.health_poll_s,
                                  settings.health_timeout_s, settings.unavailable_wait_s)
        self.healthy = self.health.healthy
        # per model: engine requests admitted at once (None: only max_concurrent_requests)
        self.admission = Admission({m: (limits or {}).get(m) for m in clients},
                                   settings.max_concurrent_requests)
        self._watcher: Optional[asyncio.Task] = None
        # (model, seconds from arrival to the first committed block) -> metrics
        self.on_first_block: Optional[Callable[[str, float], None]] = None

    # ---- readiness -------------------------------------------------------------------------
    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(m) for m in self.clients))
            await self.health.pause()

    async def _probe(self, model: str) -> None:
        client = self.clients[model]
        if model not in self.cards:
            try:
                self.cards[model] = await asyncio.wait_for(client.card(),
                                                           self.settings.health_poll_s * 2)
            except Exception:   # not loaded yet: keep polling
                return
        await self.health.probe(model, client.ping, known=True)

    def ready(self) -> bool:
        return self.health.ready()

    async def card(self, model: str) -> ModelCard:
        if model not in self.clients:
            raise model_not_found(model, sorted(self.clients))
        card = self.cards.get(model)
        if card is not None:
            return card
        try:   # first request before the watcher got the card: wait for the model to load
            card = await asyncio.wait_for(self.clients[model].card(), self.settings.model_wait_s)
        except Exception:
            raise overloaded(f"Model {model!r} is still loading; retry shortly.", retry_after_s=5)
        self.cards[model] = card
        return card

    async def model_for(self, model: str) -> ModelCard:
        """The card of a model that can serve now (bounded wait while it is down, then 503)."""
        card = await self.card(model)
        await self.health.admit(model)
        return card

    # ---- preparing ---------------------------------------------------------------------------
    async def prepare(self, body: Union[CompletionRequest, ChatCompletionRequest],
                      request_id: str) -> Prepared:
        card = await self.model_for(body.model)
        chat = isinstance(body, ChatCompletionRequest)
        prompts.check_prompt_size(body, card)
        encode = prompts.chat_prompt if chat else prompts.completion_prompts
        if prompts.total_chars(body) > TOKENIZE_INLINE_CHARS:
            # A long prompt would hold the event loop (and /health) while it is tokenized.
            prompt_ids = await asyncio.to_thread(encode, body, card)
        else:
            prompt_ids = encode(body, card)
        # The client may choose the request id (x-request-id); the engine's id must be unique.
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        reqs: list[GenerateRequest] = []
        for ids in prompt_ids:
            prompts.check_no_mask(ids, card, "messages" if chat else "prompt")
            params = prompts.sampling_params(body, card, len(ids), self.settings.max_n)
            for p in prompts.choice_params(params, body.n):
                reqs.append(GenerateRequest(f"{engine_id}-{len(reqs)}", ids, p,
                                            self.settings.request_timeout_s))
        if len(reqs) > self.settings.max_n:
            raise APIError(400, f"{len(reqs)} choices (prompts x n) exceed the limit of "
                           f"{self.settings.max_n}.", param="n")
        meta = ResponseMeta(request_id, body.model, chat)
        return Prepared(meta, reqs, body.stream, body.include_usage(), body.n)

    def _fanin(self, prep: Prepared) -> Fanin:
        client = self.clients[prep.meta.model]
        fan = Fanin([client.generate(r) for r in prep.requests], self.settings.request_timeout_s,
                    prep.meta.model)
        self.health.opened(fan.model, fan)
        return fan

    async def _close(self, fan: Fanin) -> None:
        self.health.closed(fan.model, fan)
        await fan.close()

    async def _next(self, fan: Fanin) -> Optional[tuple[int, BlockOutput]]:
        try:
            item = await fan.next()
        except DeadlineExceeded:
            raise timed_out(self.settings.request_timeout_s) from None
        except (asyncio.CancelledError, APIError):
            raise
        except Exception as exc:
            if is_replica_loss(root_cause(exc)):
                self.health.suspect(fan.model, repr(root_cause(exc)))
                raise self.health.lost(fan.model) from None
            raise map_downstream_error(exc) from None
        if item is not None:
            out = item[1]
            if out.error is not None and out.error_status == 503:   # the batcher shed it
                raise overloaded(out.error, retry_after_s=self.admission.retry_after())
            if out.error is not None:                               # the engine refused it
                raise from_value_error(ValueError(out.error))
            self.health.progress(fan.model)                         # a real block: alive
        return item

    # ---- running -----------------------------------------------------------------------------
    async def complete(self, prep: Prepared) -> dict[str, Any]:
        """Non-streaming: wait for every choice to finish; one OpenAI body."""
        choices = prep.choices()
        fan = self._fanin(prep)
        first = True
        try:
            while (item := await self._next(fan)) is not None:
                if first:
                    self._first_block(prep)
                    first = False
                choices[item[0]].add(item[1])
        finally:
            await self._close(fan)
        return full_response(prep.meta, choices)

    async def open_stream(self, prep: Prepared) -> AsyncIterator[str]:
        """Streaming: the first block is awaited before returning, so a refusal (overload,
        validation in the replica) is still a plain HTTP error, not a broken event stream."""
        fan = self._fanin(prep)
        try:
            first = await self._next(fan)
        except BaseException:
            await self._close(fan)
            raise
        self._first_block(prep)
        return self._events(prep, fan, first)

    def _first_block(self, prep: Prepared) -> None:
        if self.on_first_block is not None:
            self.on_first_block(prep.meta.model, time.perf_counter() - prep.t0)

    async def _events(self, prep: Prepared, fan: Fanin,
                      item: Optional[tuple[int, BlockOutput]]) -> AsyncIterator[str]:
        choices = prep.choices()
        started: set[int] = set()
        try:
            while item is not None:
                index, out = item
                choices[index].add(out)
                yield sse(block_chunk(prep.meta, index, out, index not in started,
                                      prep.include_usage))
                started.add(index)
                item = await self._next(fan)
            if prep.include_usage:
                yield sse(usage_chunk(prep.meta, choices))
        except APIError as exc:
            # Headers are already sent: report in-band, then end the stream cleanly (pitfall 4).
            yield sse(exc.body())
        finally:
            await self._close(fan)
        yield DONE

    async def drain(self, timeout_s: float) -> dict[str, int]:
        """Graceful shutdown: admit nothing new, let admitted requests finish for up to
        `timeout_s`, then fail the rest cleanly (503 / an in-band error event and [DONE])."""
        adm = self.admission
        adm.draining = True
        admitted = adm.requests
        deadline = time.monotonic() + timeout_s
        while adm.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = adm.requests
        if cut:
            err = APIError(503, "The server shut down before this request finished; retry.",
                           code="shutting_down", headers={"Retry-After": "1"})
            self.health.fail_all(err)
            flush = time.monotonic() + 2.0          # let the handlers write their error
            while adm.requests and time.monotonic() < flush:
                await asyncio.sleep(0.05)
        log.info("drained: %d admitted, %d finished, %d cut", admitted, admitted - cut, cut)
        return {"admitted": admitted, "finished": admitted - cut, "cut": cut}

    async def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for model, client in self.clients.items():
            try:
                out[model] = await asyncio.wait_for(client.stats(), 5.0)
            except Exception as exc:
                cause = root_cause(exc)
                out[model] = {"error": f"{type(cause).__name__}: {cause}"}
        return out

    async def loaded_models(self) -> dict[str, Any]:
        """`/v1/models`: every model whose card is known (complete entries: `created`,
        `max_model_len`). While none is, wait for the first to load (each wait bounded by
        `model_wait_s`), then 503. A model that never loads (a failed deploy) neither hides
        nor delays the others."""
        pending = {asyncio.ensure_future(self.card(m)) for m in self.clients if not self.cards}
        try:
            while pending and not self.cards:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.exception()      # retrieved: a model still loading is not an error
        finally:
            for task in pending:
                task.cancel()
        if not self.cards:
            raise overloaded("No model is loaded yet; retry shortly.", retry_after_s=5)
        return self.model_list()

    def model_list(self) -> dict[str, Any]:
        """The models whose card is known, in the config's order."""
        data = [{"id": model, "object": "model", "created": card.created,
                 "owned_by": "dfastllm-ray", "max_model_len": card.context_length}
                for model, card in ((m, self.cards.get(m)) for m in self.clients) if card]
        return {"object": "list", "data": data}
