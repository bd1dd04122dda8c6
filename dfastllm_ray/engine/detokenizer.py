"""Text for `RequestOutput`s and stop strings (the only engine code that touches the tokenizer).

A committed block never changes, so the text so far is a function of the token ids so far; the
delta is what the new block added. Stop strings cut the text before their first occurrence (and
the token ids after the token that completes it), as OpenAI's `stop` does.
"""
from __future__ import annotations

from .outputs import RequestOutput
from .request import Request


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer           # transformers tokenizer, or None (ids only)
        self._sent: dict[str, str] = {}      # request id -> text already returned

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        return min(hits) if hits else None

    def stop_cut(self, req: Request, ids: list[int]) -> int | None:
        """Generated tokens to keep when a stop string occurs in their text, else None: the
        shortest prefix of `ids` whose text contains the first stop string."""
        stops = req.params.stop
        text = self.decode(ids)
        at = self._first_stop(text, stops)
        if at is None:
            return None
        for n in range(1, len(ids) + 1):
            if self._first_stop(self.decode(ids[:n]), stops) is not None:
                return n
        return len(ids)

    @staticmethod
    def _held_back(text: str, stops: tuple[str, ...]) -> int:
        """Length of the longest end of `text` that could start a stop string: not streamed
        yet, since the next block may complete the stop string."""
        return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def attach(self, outputs: list[RequestOutput], stops: dict[str, tuple[str, ...]]) -> list[RequestOutput]:
        """Fill text / delta_text in place; stops: request id -> its stop strings."""
        for o in outputs:
            text = self.decode(o.token_ids)
            mine = stops.get(o.request_id, ())
            at = self._first_stop(text, mine)
            if at is not None:
                text = text[:at]
            elif not o.finished:
                text = text[:len(text) - self._held_back(text, mine)]
                text = text.rstrip("\ufffd")      # a UTF-8 character cut by the block end
            sent = self._sent.get(o.request_id, "")
            o.text = text
            o.delta_text = text[len(sent):] if text.startswith(sent) else text
            if o.finished:
                self._sent.pop(o.request_id, None)
            else:
                self._sent[o.request_id] = text
        return outputs
