"""OpenAI request bodies, plus the diffusion knobs clients pass through `extra_body`.

Unknown fields are refused (OpenAI's API does the same: "Unrecognized request argument"), so a
misspelt knob is a 400 naming it rather than a silently ignored setting. The knobs keep the
papers' names (`steps`, `block_length`, `threshold`, `remasking`, `alg`, ...), see
`sampling/params.py` for their meaning and rules.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dfastllm_ray.sampling.params import MAX_DRAFT_TOKENS, MAX_HYBRID_WINDOW

# Hybrid diffusion-AR decoding (docs/hybrid.md): only on a model whose config names a verifier.
HYBRID_FIELDS = ("decoding", "apd_mixture_weight", "kv_window", "max_lookahead", "draft_tokens")
# The speed dial, the request's cache mode and the newer policies (docs/policies.md).
POLICY_FIELDS = ("speed", "kv_cache_mode", "refresh_every", "refresh_on", "refresh_budget",
                 "pc_lambda", "exit_high", "exit_low", "kl_threshold", "kl_history",
                 "revoke_threshold", "dilated")
# Request fields that map 1:1 onto SamplingParams fields.
KNOBS = ("steps", "block_length", "threshold", "factor", "entropy_bound", "remasking",
         "remasking_strategy", "alg",
         "alg_temp", "cfg_scale", "top_k", "eps", "logits_eos_inf", "confidence_eos_eot_inf",
         "early_exit", "temperature", "top_p", "seed", *HYBRID_FIELDS, *POLICY_FIELDS)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    # allow_inf_nan=False: NaN / Infinity (which Python's JSON parser accepts) are refused as
    # "a finite number" rather than passing a bound check they cannot be compared against
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(1, ge=1)     # null: the default (`_null_is_default`); an int after
    stream: Optional[bool] = False        # validation, as both are read
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)   # torch takes an unsigned 64-bit seed
    user: Optional[str] = None
    # Accepted at their neutral values only (OpenAI clients may send them); see `unsupported()`.
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None
    logit_bias: Optional[dict[str, float]] = None
    # Diffusion knobs (OpenAI's `extra_body`).
    steps: Optional[int] = Field(None, ge=1)     # model forwards for the whole generation
    block_length: Optional[int] = Field(None, ge=1)   # positions decoded together per block
    threshold: Optional[float] = Field(None, gt=0, le=1)   # Fast-dLLM confidence threshold
    factor: Optional[float] = Field(None, gt=0)  # Fast-dLLM factor rule
    entropy_bound: Optional[float] = Field(None, gt=0)   # EB-sampler summed-entropy bound (nats)
    remasking: Optional[Literal["low_confidence", "random"]] = None   # LLaDA: low_confidence | random
    remasking_strategy: Optional[Literal["sequential", "low_confidence_static",
                                         "low_confidence_dynamic"]] = None   # SDAR (block diffusion)
    alg: Optional[Literal["origin", "maskgit_plus", "topk_margin", "entropy"]] = None   # Dream: origin | maskgit_plus | topk_margin | entropy
    alg_temp: Optional[float] = Field(None, ge=0)
    cfg_scale: Optional[float] = Field(None, ge=0)   # LLaDA classifier-free guidance
    top_k: Optional[int] = Field(None, ge=1)
    eps: Optional[float] = Field(None, gt=0, lt=1)
    logits_eos_inf: Optional[bool] = None
    confidence_eos_eot_inf: Optional[bool] = None
    early_exit: Optional[bool] = None
    # One speed/quality dial (docs/policies.md): a measured policy, settings and cache mode.
    speed: Optional[Literal["exact", "balanced", "fast"]] = Field(None, description=(
        "exact: the reference schedule, no approximate cache; balanced / fast: the measured "
        "points at >= 4 / >= 8 tokens per forward (docs/policies.md). Knobs set by hand win."))
    kv_cache_mode: Optional[Literal["none", "prefix", "dual"]] = Field(None, description=(
        "This request's KV cache (default: the model's engine setting)."))
    refresh_every: Optional[int] = Field(None, ge=1, le=4096, description=(
        "With a KV cache: also refresh the block's K/V every N of its steps (default: the "
        "model's engine setting; docs/policies.md)."))
    refresh_on: Optional[Literal["content"]] = Field(None, description=(
        "With a KV cache: 'content' also refreshes the block's K/V after a step that committed "
        "a token other than EOS (no cache's answers at a fraction of its forwards' cost; "
        "default: the model's engine setting; docs/policies.md)."))
    refresh_budget: Optional[int] = Field(None, ge=0, le=4096, description=(
        "With refresh_on 'content': such refreshes per request at most (default: the model's "
        "engine setting)."))
    pc_lambda: Optional[float] = Field(None, ge=0)         # PC-Sampler position decay
    dilated: Optional[bool] = None                         # DUS: one dilated group per step
    exit_high: Optional[float] = Field(None, gt=0, le=1)   # SchED exit threshold at progress 0
    exit_low: Optional[float] = Field(None, gt=0, le=1)    # SchED exit threshold at progress 1
    kl_threshold: Optional[float] = Field(None, gt=0)      # KLASS KL stability bound
    kl_history: Optional[int] = Field(None, ge=1, le=64)   # KLASS consecutive stable steps
    revoke_threshold: Optional[float] = Field(None, gt=0, le=1)   # WINO narrow-out threshold
    # Hybrid diffusion-AR decoding (needs a model with a `verifier`; docs/hybrid.md).
    decoding: Optional[Literal["diffusion", "apd", "speculative"]] = Field(None, description=(
        "diffusion (default) | apd (Adaptive Parallel Decoding: the dLLM drafts, the verifier "
        "accepts by the mixture rule) | speculative (lossless: the verifier's own distribution). "
        "apd / speculative need a model served with a verifier."))
    apd_mixture_weight: Optional[float] = Field(None, ge=0, le=1, description=(
        "APD R: accept while the draft is the argmax of R * dLLM + (1 - R) * verifier logits "
        "(default 0.7). decoding=apd only."))
    kv_window: Optional[int] = Field(None, ge=1, le=MAX_HYBRID_WINDOW, description=(
        "APD W: recompute the last W committed positions in the drafter (only with a drafter "
        "KV cache). decoding=apd only."))
    max_lookahead: Optional[int] = Field(None, ge=1, le=MAX_HYBRID_WINDOW, description=(
        "APD M: draft at most M positions per step. decoding=apd only."))
    draft_tokens: Optional[int] = Field(None, ge=1, le=MAX_DRAFT_TOKENS, description=(
        "Speculative: positions the dLLM drafts per step, adapted up to this (default 4). "
        "decoding=speculative only."))

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        """OpenAI's clients may send `n: null` / `stream: null` for "the default"."""
        return cls.model_fields[info.field_name].default if value is None else value

    def unsupported(self) -> Optional[str]:
        """The first field set to a value this server cannot honour, or None."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logprobs is not None and self.logprobs is not False:   # 0 asks for them too
            return "logprobs"
        if self.logit_bias:
            return "logit_bias"
        return None

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def sampling_overrides(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (unset ones take the model defaults)."""
        out = {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}
        if self.requested_max_tokens() is not None:
            out["max_tokens"] = self.requested_max_tokens()
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return out

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported: these models "
                             "read text only (parts of type 'text')")
        return value


class ChatMessage(BaseModel):
    # OpenAI's message fields; any other key is refused like an unknown top-level field
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None                   # passed to the chat template
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        """Only an assistant turn may leave `content` out (OpenAI: it then carries tool_calls)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs content (a string or a list of "
                             "text parts)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[dict[str, Any]] = None

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> Optional[str]:
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()
