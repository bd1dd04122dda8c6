"""OpenAI response bodies and server-sent-event chunks, built from `BlockOutput`s.

Streaming sends one chunk per committed block (a diffusion LM commits a block, not a token, at a
time), then a final chunk with `finish_reason`, an optional usage chunk
(`stream_options.include_usage`: `choices: []` and the totals) and `data: [DONE]`.
`usage.completion_tokens` counts real generated tokens only: never masks, padding or the EOS tail.
Hybrid decoding (APD / speculative) commits left to right, one span per step: each span is a
chunk, and `usage` adds `drafter_forwards` (= `nfe`) and `verifier_forwards`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .records import BlockOutput

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass
class Choice:
    """The running state of one choice while its blocks arrive."""
    index: int
    prompt_tokens: int
    text: str = ""
    num_generated: int = 0
    nfe: int = 0
    verifier_forwards: int = 0
    finish_reason: Optional[str] = None

    def add(self, out: BlockOutput) -> None:
        self.text = out.text if out.text is not None else self.text + out.delta_text
        self.num_generated = out.num_generated
        self.nfe = out.nfe
        self.verifier_forwards = out.verifier_forwards
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"


@dataclass
class ResponseMeta:
    """Identity shared by every body and chunk of one response."""
    request_id: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt = sum(c.prompt_tokens for c in choices)
    gen = sum(c.num_generated for c in choices)
    nfe = sum(c.nfe for c in choices)
    # `nfe` is ours (model forwards): generated / nfe is the tokens-per-forward speed-up.
    out = {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen,
           "nfe": nfe}
    verifier = sum(c.verifier_forwards for c in choices)
    if verifier:     # hybrid decoding (APD / speculative): both models' forwards
        out.update(drafter_forwards=nfe, verifier_forwards=verifier)
    return out


def full_response(meta: ResponseMeta, choices: list[Choice]) -> dict[str, Any]:
    if meta.chat:
        body = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        return {**meta.head("chat.completion"), "choices": body, "usage": usage(choices)}
    body = [{"index": c.index, "text": c.text, "logprobs": None,
             "finish_reason": c.finish_reason} for c in choices]
    return {**meta.head("text_completion"), "choices": body, "usage": usage(choices)}


def block_chunk(meta: ResponseMeta, index: int, out: BlockOutput, first: bool,
                include_usage: bool) -> dict[str, Any]:
    """One committed block of one choice as an OpenAI chunk."""
    reason = (out.finish_reason or "stop") if out.finished else None
    if meta.chat:
        delta: dict[str, Any] = {"content": out.delta_text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        chunk = {**meta.head("chat.completion.chunk"), "choices": [choice]}
    else:
        choice = {"index": index, "text": out.delta_text, "logprobs": None, "finish_reason": reason}
        chunk = {**meta.head("text_completion"), "choices": [choice]}
    if include_usage:
        chunk["usage"] = None     # OpenAI: null on every chunk but the last when usage is asked for
    return chunk


def usage_chunk(meta: ResponseMeta, choices: list[Choice]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if meta.chat else "text_completion"
    return {**meta.head(obj), "choices": [], "usage": usage(choices)}
