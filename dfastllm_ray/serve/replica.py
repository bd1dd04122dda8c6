"""The model replica: one `AsyncEngine` per Serve replica (one GPU), wrapped for the API.

`ReplicaCore` is plain Python (tests drive it in-process through `LocalClient`); `ModelReplica`
is the Serve deployment around it. The engine is built by an injected factory
(`ModelConfig.engine_factory`, Ray Serve LLM's `engine_cls` idea), so tests swap in a small engine.
A request whose stream is closed early (client gone, ingress timeout) is aborted in the engine,
which frees its KV pages within a step.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import time
from dataclasses import asdict
from typing import Any, AsyncIterator, Callable, Optional

from ray import serve

from dfastllm_ray.engine.async_engine import AsyncEngine
from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.output_limit import OutputCut
from dfastllm_ray.sampling.defaults import generation_defaults
from dfastllm_ray.sampling.params import unused_knobs

from .config import ModelConfig
from .metrics import ReplicaMetrics
from .priority import restore_priority
from .quiet_logs import quiet_health_calls
from .records import BlockOutput, GenerateRequest, ModelCard, ReplicaCounters

log = logging.getLogger("ray.serve.dfastllm")
# A replica-side deadline a little after the ingress's, so the ingress (which can answer 504)
# normally fires first; this one only matters if the ingress is gone.
REPLICA_TIMEOUT_GRACE_S = 1.0


def import_object(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_engine(cfg: ModelConfig) -> tuple[Any, ModelCard]:
    """The production factory: load the checkpoint, start an `AsyncEngine` on it."""
    ecfg = EngineConfig(**cfg.engine)
    loaded = load_model(cfg.model_source, dtype=ecfg.dtype, device=ecfg.device)
    if loaded.tokenizer is None:
        raise ValueError(f"model_source={cfg.model_source!r} has no tokenizer files; the API "
                         "needs tokenizer.json / tokenizer_config.json beside the weights")
    context = loaded.spec.max_position
    if ecfg.max_model_len is not None:
        context = min(context, ecfg.max_model_len)
    check_defaults(cfg, loaded.spec.arch, context)
    verifier = load_verifier(cfg, loaded)
    card = ModelCard(cfg.model_id, loaded.tokenizer, context, loaded.spec.vocab_size,
                     generation_defaults(loaded.generation_defaults, cfg.sampling_defaults),
                     cfg.max_tokens_limit, int(time.time()), loaded.spec.arch,
                     cfg.verifier.model_source if cfg.verifier else None,
                     loaded.spec.block_size, loaded.spec.mask_token_id)
    return AsyncEngine(Engine(loaded, ecfg, verifier=verifier)), card


def check_defaults(cfg: ModelConfig, arch: str, context: int) -> None:
    """A `sampling_defaults` knob the checkpoint's family does not read, or a `max_tokens` past
    its context, would make every request that leaves it out a 400 naming a field the client
    never sent: refused at start, naming the YAML field (the family and the context are known
    only once the checkpoint's config is read)."""
    max_tokens = cfg.sampling_defaults.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens >= context:
        raise ValueError(f"models[{cfg.model_id}].sampling_defaults.max_tokens={max_tokens}: "
                         f"the model's context is {context} tokens (prompt + max_tokens); use "
                         f"at most {context - 1}, well below it to leave room for prompts")
    foreign = unused_knobs(cfg.sampling_defaults, arch)
    if foreign:
        raise ValueError(f"models[{cfg.model_id}].sampling_defaults.{foreign[0]}="
                         f"{cfg.sampling_defaults[foreign[0]]!r}: {cfg.model_source!r} is a "
                         f"{arch}-family checkpoint, which does not read {', '.join(foreign)}; "
                         "remove it from sampling_defaults")


def load_verifier(cfg: ModelConfig, loaded: Any) -> Any:
    """`verifier:` of the model entry, on the model's device (its dtype unless the entry names
    one); None without a verifier."""
    if cfg.verifier is None:
        return None
    dtype = cfg.verifier.dtype or loaded.dtype
    try:
        return load_model(cfg.verifier.model_source, dtype=dtype, device=str(loaded.device))
    except (OSError, ValueError) as exc:
        raise ValueError(f"models[{cfg.model_id}].verifier.model_source="
                         f"{cfg.verifier.model_source!r} could not be loaded: {exc}") from exc


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class ReplicaCore:
    def __init__(self, cfg: ModelConfig, engine: Any, card: ModelCard) -> None:
        self.cfg, self.engine, self._card = cfg, engine, card
        self.metrics = ReplicaMetrics(cfg.model_id)
        self.counters = ReplicaCounters()

    @classmethod
    async def create(cls, cfg: ModelConfig,
                     factory: Optional[Callable[[ModelConfig], tuple[Any, ModelCard]]] = None
                     ) -> "ReplicaCore":
        factory = factory or import_object(cfg.engine_factory)
        # Loading takes seconds to minutes; a thread keeps the replica's event loop responsive.
        engine, card = await asyncio.to_thread(factory, cfg)
        return cls(cfg, engine, card)

    def card(self) -> ModelCard:
        return self._card

    def _decode(self, ids: list[int]) -> str:
        """The engine detokenizer's convention (special tokens skipped)."""
        return self._card.tokenizer.decode(ids, skip_special_tokens=True)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]:
        self.counters.requests += 1
        deadline = None
        if req.timeout_s is not None:
            deadline = time.monotonic() + req.timeout_s + REPLICA_TIMEOUT_GRACE_S
        stream = self.engine.generate(req.prompt_token_ids, req.params, req.request_id)
        cut = OutputCut(req.params.output_limit, self._decode)
        last, failed = None, False
        try:
            while last is None or not last.finished:
                try:
                    raw = await self._next(stream, deadline)
                except StopAsyncIteration:
                    break
                last = cut(raw)
                if last.finished and not raw.finished:   # cut at max_tokens: free the slot now
                    await _maybe_await(self.engine.abort(req.request_id))
                yield _block(last, req)
        except TimeoutError:
            raise                      # past the deadline: an abort, like a client leaving
        except ValueError as exc:      # the engine refused this request: a 400, not a failure
            failed = True              # of the replica, so no exception (and no ERROR traceback
            log.info("refused: %s", exc, extra={"engine_request_id": req.request_id})
            yield BlockOutput(req.request_id, "", 0, 0, finished=True, finish_reason="error",
                              error=str(exc))   # in Serve's logs); the ingress answers 400
        except Exception:
            failed = True
            raise
        finally:
            await self._finish(req, last, stream, failed)

    @staticmethod
    async def _next(stream: Any, deadline: Optional[float]) -> Any:
        if deadline is None:
            return await anext(stream)
        try:
            return await asyncio.wait_for(anext(stream), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise TimeoutError("the request ran past its deadline in the replica") from None

    async def _finish(self, req: GenerateRequest, last: Any, stream: Any, failed: bool) -> None:
        finished = last is not None and last.finished
        if not finished:   # closed early or failed: free the engine's slot and KV pages now
            if failed:
                self.counters.failed += 1
            else:
                self.counters.aborted += 1
            try:
                await _maybe_await(self.engine.abort(req.request_id))
                if hasattr(stream, "aclose"):
                    await stream.aclose()
            except Exception as exc:   # the request may already be gone; never mask the cause
                log.warning("abort failed: %r", exc, extra={"engine_request_id": req.request_id})
            log.info("aborted" if not failed else "failed",
                     extra={"engine_request_id": req.request_id})
        else:
            self.counters.finished += 1
        gen = len(last.token_ids) if last is not None else 0
        nfe = last.nfe if last is not None else 0
        vf = getattr(last, "verifier_forwards", 0) if last is not None else 0
        self.counters.prompt_tokens += len(req.prompt_token_ids)
        self.counters.generated_tokens += gen
        self.counters.nfe += nfe
        self.counters.verifier_forwards += vf
        self.metrics.request_done(len(req.prompt_token_ids), gen, nfe, vf)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.engine.stats(), "replica": asdict(self.counters)}

    async def check_health(self) -> None:
        await _maybe_await(self.engine.check_health())

    async def poll_metrics(self) -> None:
        """Engine gauges (queue, running, KV use, prefix hits, step latency) every interval."""
        while True:
            try:
                self.metrics.engine_stats(self.engine.stats())
            except Exception as exc:   # metrics must never take the replica down
                log.warning("engine stats failed: %r", exc)
            await asyncio.sleep(self.cfg.metrics_interval_s)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _block(out: Any, req: GenerateRequest) -> BlockOutput:
    return BlockOutput(request_id=req.request_id, delta_text=out.delta_text,
                       num_generated=len(out.token_ids), nfe=out.nfe, finished=out.finished,
                       finish_reason=out.finish_reason, text=out.text if out.finished else None,
                       num_prompt_tokens=out.num_prompt_tokens,
                       verifier_forwards=getattr(out, "verifier_forwards", 0))


@serve.deployment
class ModelReplica:
    """A Serve replica holding one engine. `check_health` fails once the engine loop has died,
    and Serve replaces the replica."""

    async def __init__(self, cfg: ModelConfig) -> None:
        restore_priority(f"model replica {cfg.model_id}")   # before the engine's threads start
        quiet_health_calls()
        self.core = await ReplicaCore.create(cfg)
        self._poller = asyncio.create_task(self.core.poll_metrics())
        log.info("model %s ready", cfg.model_id)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[BlockOutput]:
        async for out in self.core.generate(req):
            yield out

    def card(self) -> ModelCard:
        return self.core.card()

    def stats(self) -> dict[str, Any]:
        import ray
        # which replica answered: its Ray actor name (operators kill or inspect it by name)
        return {**self.core.stats(), "actor_name": ray.get_runtime_context().get_actor_name(),
                "pid": os.getpid()}

    async def ping(self) -> None:
        await self.core.check_health()

    async def check_health(self) -> None:
        await self.core.check_health()

    def __del__(self) -> None:
        # Serve calls this on replica shutdown, after draining (graceful_shutdown_timeout_s).
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown()
