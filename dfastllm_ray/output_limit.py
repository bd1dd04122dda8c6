"""Cutting an engine output at the request's `max_tokens` when the canvas was rounded up.

`SamplingParams.resolve()` decodes a `max_tokens` that is not a multiple of `block_length` on a
canvas of whole blocks and keeps the asked count in `output_limit`. The engine decodes the whole
canvas; the edges that return text (the offline `LLM`, the Serve replica) pass every output of
the request through one `OutputCut`, which keeps the first `output_limit` tokens, re-decodes the
text of the block that crosses the limit and reports `finish_reason="length"` there. Only the
last block of the canvas can cross the limit, so earlier outputs pass through unchanged.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional


class OutputCut:
    def __init__(self, limit: Optional[int], decode: Callable[[list[int]], str]) -> None:
        self.limit = limit                   # tokens returned at most; None: no cut
        self.decode = decode                 # token ids -> text (skip special tokens)
        self.sent = ""                       # text already returned for this request

    def __call__(self, out: Any) -> Any:
        """A RequestOutput-like record (token_ids, text, delta_text, finished, finish_reason)
        -> the same record cut at the limit; `.finished` is True once the limit is reached."""
        if self.limit is None or len(out.token_ids) < self.limit or (
                len(out.token_ids) == self.limit and out.finished):
            self.sent = out.text
            return out
        ids = list(out.token_ids[:self.limit])
        text = self.decode(ids)
        if out.finished and len(out.text) < len(text) and text.startswith(out.text):
            text = out.text                  # a stop string cut the engine's text earlier
        delta = text[len(self.sent):] if text.startswith(self.sent) else text
        self.sent = text
        cut = len(out.token_ids) > self.limit
        return replace(out, token_ids=ids, text=text, delta_text=delta, finished=True,
                       finish_reason="length" if cut or not out.finished else out.finish_reason,
                       delta_token_ids=list(out.delta_token_ids)[:max(
                           0, len(out.delta_token_ids) - (len(out.token_ids) - self.limit))])
