"""A small engine with the `AsyncEngine` interface, for testing the HTTP layer in milliseconds.

Each block "commits" `block_length` characters of a fixed alphabet after `step_delay_s`, so tests
control timing (timeouts, disconnects) exactly. A prompt containing "STOP" ends after one block
with finish_reason "stop", like an EOS early exit.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

from dfastllm_ray.serve.config import ModelConfig
from dfastllm_ray.serve.records import ModelCard

BOS = 256
VOCAB = 300
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """One id per byte, BOS = 256; a chat template of "<role>content" turns."""
    chat_template = "role-tags"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) % 256 for c in text]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in ids if t < 256)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class Out:
    request_id: str
    text: str
    delta_text: str
    token_ids: list[int]
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    nfe: int
    num_prompt_tokens: int


class FakeEngine:
    def __init__(self, step_delay_s: float = 0.0) -> None:
        self.step_delay_s = step_delay_s
        self.aborted: list[str] = []
        self.seen: list[tuple[list[int], Any]] = []   # (prompt ids, params) per request
        self.request_ids: list[str] = []
        self.running = 0
        self.dead = False

    async def generate(self, prompt_token_ids: list[int], params: Any,
                       request_id: str) -> AsyncIterator[Out]:
        self.seen.append((list(prompt_token_ids), params))
        self.request_ids.append(request_id)
        self.running += 1
        text, ids, nfe = "", [], 0
        stop = "STOP" in "".join(chr(t) for t in prompt_token_ids if t < 256)
        try:
            for start in range(0, params.max_tokens, params.block_length):
                await asyncio.sleep(self.step_delay_s)
                n = min(params.block_length, params.max_tokens - start)
                delta = "".join(ALPHABET[(start + i) % 26] for i in range(n))
                text, ids, nfe = text + delta, ids + [ord(c) for c in delta], nfe + 1
                last = stop or start + n >= params.max_tokens
                yield Out(request_id, text, delta, list(ids), [ord(c) for c in delta], last,
                          ("stop" if stop else "length") if last else None, nfe,
                          len(prompt_token_ids))
                if last:
                    return
        finally:
            self.running -= 1

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> dict[str, Any]:
        return {"num_running": self.running, "num_waiting": 0, "aborted": len(self.aborted)}

    def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("engine loop died")

    def shutdown(self) -> None:
        self.dead = True


def fake_card(model_id: str = "fake", context_length: int = 256, arch: str = "llada",
              **defaults: Any) -> ModelCard:
    return ModelCard(model_id, CharTokenizer(), context_length, VOCAB,
                     {"block_length": 4, "max_tokens": 8, **defaults}, None, 0, arch)


def build_fake_engine(cfg: ModelConfig) -> tuple[FakeEngine, ModelCard]:
    """An `engine_factory` for ModelConfig: `serve_fakes:build_fake_engine` (tests/serve on the path)."""
    return FakeEngine(step_delay_s=0.01), fake_card(cfg.model_id, **cfg.sampling_defaults)
