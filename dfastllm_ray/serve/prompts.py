"""Request body -> prompt token ids and resolved `SamplingParams`, refusing bad input with 400.

This runs in the ingress, before any queue: an empty prompt, a prompt longer than the context, a
`max_tokens` of a million or a bad knob is refused at once, never after waiting for a replica.
Tokenization follows the offline `LLM` (`encode_prompt` / `encode_chat`) so HTTP and offline
decoding see the same ids.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Union

from dfastllm_ray.sampling.params import SEED_BOUND, SamplingParams, unused_knobs
from dfastllm_ray.engine.block_diffusion import resolve_block_diffusion

from .errors import bad_request, from_value_error
from .hybrid import hybrid_fields
from .protocol import ChatCompletionRequest, CompletionRequest, _Body
from .records import ModelCard

# Generous upper bound of characters per token (BPE tokens average ~4 characters).
MAX_CHARS_PER_TOKEN = 64


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Plain completion prompt: the tokenizer's own special-token convention (BOS where it adds one)."""
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Chat prompt: the checkpoint's template with the assistant turn opened, rendered to text and
    encoded like a plain prompt (as LLaDA's and Dream's chat examples, and `LLM.chat`, do)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return encode_prompt(tokenizer, text)


def completion_prompts(body: CompletionRequest, card: ModelCard) -> list[list[int]]:
    """One token-id list per prompt (a list of strings or of id lists gives several choices)."""
    prompt: Union[str, list] = body.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty.", param="prompt")
    out = []
    for item in items:
        ids = encode_prompt(card.tokenizer, item) if isinstance(item, str) else list(item)
        if not ids or (isinstance(item, str) and not item):
            raise bad_request("prompt must not be empty.", param="prompt")
        bad = [t for t in ids if not 0 <= t < card.vocab_size]
        if bad:
            raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary "
                              f"[0, {card.vocab_size}).", param="prompt")
        out.append(ids)
    return out


def check_no_mask(ids: list[int], card: ModelCard, param: str) -> None:
    """A diffusion model's [MASK] id marks a position to decode; in a prompt (a user's text
    holding "<|mdm_mask|>", or a token-id prompt) it has no defined meaning here: this server
    decodes only after the prompt (no infilling), so it is refused rather than fed to the model."""
    if card.mask_token_id is not None and card.mask_token_id in ids:
        token = getattr(card.tokenizer, "mask_token", None) or "the mask token"
        raise bad_request(f"The prompt holds {token} (token id {card.mask_token_id}), which "
                          f"marks a position to decode in {card.model_id!r}; this server decodes "
                          "after the prompt only (no infilling): remove it from the prompt.",
                          param=param)


def total_chars(body: _Body) -> int:
    if isinstance(body, ChatCompletionRequest):
        return sum(len(m.text()) for m in body.messages)
    prompt = body.prompt   # type: ignore[attr-defined]
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)   # ids count as 1


def check_prompt_size(body: _Body, card: ModelCard) -> None:
    """Refuse a prompt far beyond the context before tokenizing it at all: no tokenizer makes
    more than one token per character, and none packs MAX_CHARS_PER_TOKEN characters into one."""
    if total_chars(body) > card.context_length * MAX_CHARS_PER_TOKEN:
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        raise bad_request(f"The prompt is far longer than this model's context of "
                          f"{card.context_length} tokens.", param=param,
                          code="context_length_exceeded")


def chat_prompt(body: ChatCompletionRequest, card: ModelCard) -> list[list[int]]:
    """The chat template's ids. An empty or blank message is a valid OpenAI turn and is encoded
    as it is (the tiny models answer it with their greeting)."""
    return [chat_ids(card, body.messages)]


def chat_ids(card: ModelCard, messages: list[Any], add_generation_prompt: bool = True
             ) -> list[int]:
    """The ids of `messages` (ChatMessage records) under the model's chat template; an empty
    list, a model without a template or a template that raises is a 400 (chat completions and
    /tokenize alike)."""
    if not messages:
        raise bad_request("messages must hold at least one message.", param="messages")
    if getattr(card.tokenizer, "chat_template", None) is None:
        raise bad_request(f"model {card.model_id!r} has no chat template; use /v1/completions.",
                          param="model")
    turns = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
    try:
        if add_generation_prompt:
            return encode_chat(card.tokenizer, turns)
        text = card.tokenizer.apply_chat_template(turns, tokenize=False)
        return list(card.tokenizer(text)["input_ids"])
    except Exception as exc:   # a template may raise on a role order it does not accept
        raise bad_request(f"the chat template rejected the messages: {exc}", param="messages")


def sampling_params(body: _Body, card: ModelCard, prompt_len: int, max_n: int) -> SamplingParams:
    """Model defaults < request fields; validated and resolved against the context length.
    Every refusal is a 400 naming the field, the value and the bound."""
    unsupported = body.unsupported()
    if unsupported:
        raise bad_request(f"{unsupported}={getattr(body, unsupported)!r} is not supported by this "
                          f"server; leave {unsupported} out (or null).", param=unsupported,
                          code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true.",
                          param="stream_options")
    if body.n > max_n:
        raise bad_request(f"n={body.n} is invalid: at most {max_n} choices per request.", param="n")
    if prompt_len >= card.context_length:
        raise bad_request(f"The prompt is {prompt_len} tokens; this model's context is "
                          f"{card.context_length} tokens (prompt + max_tokens).",
                          param="messages" if hasattr(body, "messages") else "prompt",
                          code="context_length_exceeded")
    overrides = body.sampling_overrides()
    foreign = unused_knobs(overrides, card.arch)
    if foreign:
        family = {"dream": "Dream", "sdar": "SDAR"}.get(card.arch, "LLaDA")
        raise bad_request(f"{foreign[0]}={overrides[foreign[0]]!r} is invalid: {card.model_id!r} "
                          f"is {'an' if family == 'SDAR' else 'a'} {family}-family model, which does not use "
                          f"{', '.join(foreign)}; leave {'them' if len(foreign) > 1 else 'it'} out.",
                          param=foreign[0])
    fields = hybrid_fields(overrides, card)     # no verifier: hybrid fields are a 400
    limit = card.max_tokens_limit
    mt = fields.get("max_tokens")
    if limit is not None and isinstance(mt, int) and mt > limit:
        raise bad_request(f"max_tokens={mt} is invalid: this server allows at most {limit}.",
                          param="max_tokens")
    try:
        if card.block_size:         # block diffusion: blocks from the canvas start (the engine's)
            return resolve_block_diffusion(SamplingParams(**fields), prompt_len, card.block_size,
                                           card.context_length)
        steps = fields.pop("steps", None)      # bounded by the canvas, checked once it is known
        params = SamplingParams(**fields).resolve(max_context=card.context_length,
                                                  prompt_len=prompt_len)
    except ValueError as exc:
        raise from_value_error(exc) from None
    except TypeError as exc:   # a wrong type SamplingParams' checks compare against (e.g. "abc" < 0)
        raise bad_request(str(exc)) from None
    if steps is None:
        return params
    if steps > params.max_tokens:
        # One forward per generated position at most: more only adds forwards that commit
        # nothing, and a huge schedule would stall every other request while it is built.
        raise bad_request(f"steps={steps} is invalid: at most {params.max_tokens} "
                          "(one forward per generated position; max_tokens rounded up to whole "
                          f"blocks of {params.block_length}).", param="steps")
    try:
        return replace(params, steps=steps)
    except ValueError as exc:
        raise from_value_error(exc) from None


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """`n` choices of one prompt: distinct seeds when seeded, so sampled choices differ
    (seed + i, wrapped into the 64-bit seed range)."""
    if n == 1:
        return [params]
    return [replace(params, seed=None if params.seed is None else (params.seed + i) % SEED_BOUND)
            for i in range(n)]
