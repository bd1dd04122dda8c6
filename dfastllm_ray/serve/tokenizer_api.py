"""vLLM-compatible tokenizer routes: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.

Clients that count tokens with the server's own tokenizer (lm-eval-harness's
`local-completions` / `local-chat-completions` probe `/tokenizer_info` and then tokenize
remotely) need these; the shapes follow vLLM's (`count`, `max_model_len`, `tokens`,
`token_strs`; `prompt`). `model` may be left out when the app serves one model, or several with
one vocabulary and EOS (lm-eval never names it): the first model's tokenizer answers, and
`/tokenizer_info` describes it (its BOS, mask and chat template); `messages` also need the
same chat template. The ingress
holds each model's tokenizer (the model card), so no replica is called.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict

from .errors import bad_request
from .prompts import chat_ids
from .protocol import ChatMessage
from .records import ModelCard
from .server import OpenAIServer

INFO_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token",
               "chat_template", "add_bos_token", "add_eos_token", "padding_side")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    tokens: list[int]


def tokenizer_info(card: ModelCard) -> dict[str, Any]:
    tok = card.tokenizer
    out: dict[str, Any] = {"tokenizer_class": type(tok).__name__,
                           "model_max_length": card.context_length, "vocab_size": card.vocab_size}
    for name in INFO_FIELDS:
        value = getattr(tok, name, None)
        if value is not None and isinstance(value, (str, int, bool)):
            out[name] = value
    return out


def _tokens(card: ModelCard, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of prompt (text) or messages (chat).",
                          param="prompt")
    if body.prompt is not None:
        return list(card.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)
                    ["input_ids"])
    return chat_ids(card, body.messages or [], body.add_generation_prompt)


def same_tokenizer(a: ModelCard, b: ModelCard) -> bool:
    """Same ids for the same text and the same end of text: one vocabulary, one EOS."""
    if a.tokenizer is b.tokenizer:
        return True
    vocab_a, vocab_b = (getattr(c.tokenizer, "get_vocab", None) for c in (a, b))
    if vocab_a is None or vocab_b is None:
        return False
    return (vocab_a() == vocab_b()
            and getattr(a.tokenizer, "eos_token", None) == getattr(b.tokenizer, "eos_token", None))


def same_template(a: ModelCard, b: ModelCard) -> bool:
    """The same chat template and BOS: `messages` render to the same ids."""
    return all(getattr(a.tokenizer, k, None) == getattr(b.tokenizer, k, None)
               for k in ("chat_template", "bos_token"))


def add_tokenizer_routes(app: FastAPI, server: OpenAIServer, guard: Any) -> None:
    shared: dict[str, bool] = {}     # the verdict of `same_tokenizer`, once the cards loaded

    async def card_for(model: Optional[str], chat: bool = False) -> ModelCard:
        """The named model's card; unnamed, the first model's, if every served model has the
        same tokenizer (lm-eval never names the model here; configs/tiny.yaml serves two models
        on one vocabulary) and, for `messages`, the same chat template; else a 400 asking for
        `model`."""
        if model is not None:
            return await server.card(model)
        cards = [await server.card(m) for m in server.clients]
        kind = "chat templates" if chat else "tokenizers"
        if kind not in shared:
            shared[kind] = all(same_tokenizer(cards[0], c) and (not chat or same_template(
                cards[0], c)) for c in cards[1:])
        if not shared[kind]:
            raise bad_request(f"model is required: this server serves {sorted(server.clients)} "
                              f"with different {kind}.", param="model")
        return cards[0]

    for prefix in ("", "/v1"):       # vLLM serves them at the root; some clients add /v1
        @app.get(f"{prefix}/tokenizer_info", dependencies=[Depends(guard)])
        async def info(model: Optional[str] = None) -> dict[str, Any]:
            return tokenizer_info(await card_for(model))

        @app.post(f"{prefix}/tokenize", dependencies=[Depends(guard)])
        async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
            card = await card_for(body.model, chat=body.messages is not None)
            ids = _tokens(card, body)
            strs: Union[list[str], None] = None
            if body.return_token_strs:
                to_tokens = getattr(card.tokenizer, "convert_ids_to_tokens", None)
                strs = (list(to_tokens(ids)) if to_tokens is not None
                        else [card.tokenizer.decode([t]) for t in ids])
            return {"count": len(ids), "max_model_len": card.context_length, "tokens": ids,
                    "token_strs": strs}

        @app.post(f"{prefix}/detokenize", dependencies=[Depends(guard)])
        async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
            card = await card_for(body.model)
            bad = [t for t in body.tokens if not 0 <= t < card.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                                  f"[0, {card.vocab_size}).", param="tokens")
            return {"prompt": card.tokenizer.decode(body.tokens)}
