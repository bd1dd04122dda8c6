"""The FastAPI app: OpenAI routes, health routes, guards, request ids and error bodies.

`build_api` closes over an `OpenAIServer`; the ingress deployment returns it from
`__serve_build_asgi_app__`, and tests mount the same app on an in-process transport.
Health routes take no key and touch no replica: they answer from the server's cached readiness.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import Admission
from .errors import APIError, error_body, http_error, validation_error
from .guards import ApiKeys, RateLimiter
from .metrics import IngressMetrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .schema import api_schema
from .server import OpenAIServer
from .tokenizer_api import add_tokenizer_routes

log = logging.getLogger("ray.serve.dfastllm")
OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found",
            405: "method_not_allowed", 413: "bad_request", 422: "bad_request",
            429: "rate_limited", 499: "client_closed", 503: "overloaded", 504: "timeout"}
UNMATCHED = "unmatched"    # the `route` label of a path no route matched (one series, not one per path)


class RequestContext:
    """Pure ASGI middleware (BaseHTTPMiddleware breaks streaming cancellation): a request id
    on every request, response and log line, one JSON access log line and outcome metrics."""

    def __init__(self, app: Any, metrics: Optional[IngressMetrics], add_header: bool,
                 admission: Optional[Admission] = None) -> None:
        self.app, self.metrics, self.add_header = app, metrics, add_header
        self.admission = admission    # its front gate refuses before routing and body parsing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status, t0, complete = [499], time.perf_counter(), [False]
        if self.admission is not None and scope.get("path") in GENERATION_PATHS:
            # Decided here, synchronously, before the first await: a refusal never waits for
            # its body to come in from the proxy, nor behind the requests it would queue with.
            refusal = self.admission.front()
            if refusal is not None:
                await _send_error(send, refusal, rid if self.add_header else None)
                return self._record(scope, rid, refusal.status, time.perf_counter() - t0)
            state[FRONT_HELD] = True

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.add_header:   # behind Serve's proxy, the proxy adds it
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status[0] = 500 if status[0] == 499 else status[0]
            raise
        finally:
            if state.pop(FRONT_HELD, False):      # never reached `generate` (401, 422, ...)
                self.admission.settle()
            # 499 (nginx's "client closed request"): cancelled before any response, or a
            # response (a stream) the client left before its last byte
            if not complete[0] and status[0] < 400:
                status[0] = 499
            self._record(scope, rid, status[0], time.perf_counter() - t0)

    def _record(self, scope: dict, rid: str, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        model = scope["state"].get("model", "")
        log.info("%s %s %d %.1fms%s", scope.get("method"), path, status, seconds * 1000,
                 f" model={model}" if model else "",
                 extra={"request_id": rid, "route": path, "status": status, "model": model,
                        "latency_ms": round(seconds * 1000, 2)})
        if self.admission is not None and status in (429, 503):
            self.admission.refusal_s.append(seconds)
        if self.metrics is not None and not path.startswith("/health"):
            # the matched route's template ("/v1/models/{model}"): a label per route, not per
            # path a client or a scanner sends (the front gate refuses before routing)
            route = getattr(scope.get("route"), "path", None) or (
                path if path in GENERATION_PATHS else UNMATCHED)
            self.metrics.request(model, route, OUTCOMES.get(status, "error"), seconds)


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
FRONT_HELD = "admission_pending"   # scope state: holds a pending place of the front gate


async def _send_error(send: Any, err: APIError, rid: Optional[str]) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if rid is not None:
        headers.append((b"x-request-id", rid.encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()), request.headers.get("content-type"))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        err = http_error(exc.status_code, str(exc.detail), request.method, request.url.path,
                         (headers or {}).get("Allow"))
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request.state.request_id})
        return JSONResponse(error_body(500, "Internal server error."), status_code=500)


def build_api(server: OpenAIServer, keys: ApiKeys, limiter: Optional[RateLimiter] = None,
              metrics: Optional[IngressMetrics] = None, add_request_id_header: bool = True
              ) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        yield
        await server.stop()

    # The schema is served by a route below, behind the API key when auth is on.
    app = FastAPI(title="dfastllm-ray", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(RequestContext, metrics=metrics, add_header=add_request_id_header,
                       admission=server.admission)
    _install_error_handlers(app)

    def guard(request: Request) -> None:
        key = keys.check(request.headers.get("authorization"))
        if limiter is not None:
            client = key or (request.client.host if request.client else "unknown")
            limiter.acquire(client)

    _add_health_routes(app, server)
    _add_model_routes(app, server, guard)
    _add_generation_routes(app, server, guard)
    add_tokenizer_routes(app, server, guard)

    @app.get("/openapi.json", dependencies=[Depends(guard)], include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(api_schema(app))
    return app


def _add_health_routes(app: FastAPI, server: OpenAIServer) -> None:
    def readiness() -> JSONResponse:
        ok = server.ready() and not server.admission.draining
        body = {"status": "ready" if ok else ("draining" if server.admission.draining
                                               else "not_ready"),
                "models": {m: ("ready" if h else "not_ready") for m, h in server.healthy.items()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        return readiness()

    @app.get("/health")
    async def health() -> JSONResponse:
        return readiness()


def _add_model_routes(app: FastAPI, server: OpenAIServer, guard: Any) -> None:
    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def models() -> dict[str, Any]:
        return await server.loaded_models()

    @app.get("/v1/models/{model}", dependencies=[Depends(guard)])
    async def model(model: str) -> dict[str, Any]:
        await server.card(model)    # 404 for an unknown model
        return next(m for m in server.model_list()["data"] if m["id"] == model)

    @app.get("/v1/engine/stats", dependencies=[Depends(guard)])
    async def stats() -> dict[str, Any]:
        adm = server.admission
        return {"models": await server.stats(),
                "ingress": {"inflight": adm.requests, "admitted": dict(adm.inflight),
                            "limits": dict(adm.limits), "refused": adm.refused,
                            "refusal_ms_p99": adm.refusal_p99_ms(),
                            "draining": adm.draining}}


def _add_generation_routes(app: FastAPI, server: OpenAIServer, guard: Any) -> None:
    async def generate(request: Request, body: Union[CompletionRequest, ChatCompletionRequest]):
        request.state.model = body.model
        admission = server.admission
        if request.scope["state"].pop(FRONT_HELD, False):
            admission.settle()                # the front gate's place becomes the model's
        admission.check(body.model)           # shed before any work: 503 + Retry-After
        admission.requests += 1
        admission.enter(body.model, 1)        # reserved now: no await between check and enter
        t0, choices, streaming, done = time.perf_counter(), 1, False, False
        try:
            prep = await server.prepare(body, request.state.request_id)
            if len(prep.requests) > 1:        # n / prompt lists: every choice takes a slot
                admission.check_model(body.model, len(prep.requests) - 1)
                admission.enter(body.model, len(prep.requests) - 1)
                choices = len(prep.requests)
            if not prep.stream:
                out = JSONResponse(await server.complete(prep))
                done = True
                return out
            events = await server.open_stream(prep)
            streaming = True
            return StreamingResponse(_counted(events, server, body.model, choices, t0),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finally:
            if not streaming:
                admission.requests -= 1
                admission.leave(body.model, choices, time.perf_counter() - t0 if done else None)

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(request: Request, body: CompletionRequest):
        return await generate(request, body)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat(request: Request, body: ChatCompletionRequest):
        return await generate(request, body)


async def _counted(events: AsyncIterator[str], server: OpenAIServer, model: str, choices: int,
                   t0: float) -> AsyncIterator[str]:
    """The stream holds its admission until its last event (or the client leaves)."""
    done = False
    try:
        async for event in events:
            yield event
        done = True
    finally:
        server.admission.requests -= 1
        server.admission.leave(model, choices, time.perf_counter() - t0 if done else None)
        await events.aclose()   # type: ignore[attr-defined]
