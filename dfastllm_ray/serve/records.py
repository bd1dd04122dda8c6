"""Typed records that cross the ingress -> batcher and ingress -> replica hops (pickled by Ray).

Plain fields only: the ingress tokenizes and validates, the replica decodes; what travels is
token ids, resolved `SamplingParams` and small per-block outputs, never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dfastllm_ray.sampling.params import SamplingParams


@dataclass(frozen=True)
class ModelCard:
    """What the ingress needs to validate and tokenize for one model (fetched once per model)."""
    model_id: str
    tokenizer: Any                      # transformers tokenizer (picklable); encode + chat template
    context_length: int                 # tokens: prompt + max_tokens must fit
    vocab_size: int                     # prompt token ids must be below this
    defaults: dict[str, Any]            # SamplingParams fields: generation_config.json + config
    max_tokens_limit: Optional[int] = None
    created: int = 0                    # unix seconds the replica loaded the model
    arch: str = "llada"                 # model family ("llada", "dream", "sdar"): which knobs it reads
    verifier: Optional[str] = None      # the verifier's model_source (None: no hybrid decoding)
    block_size: Optional[int] = None    # block diffusion (SDAR): the checkpoint's block; None: not one
    mask_token_id: Optional[int] = None  # the [MASK] id: refused in prompts (None: no check)


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]         # already templated and tokenized by the ingress
    params: SamplingParams              # resolved: max_tokens / steps / block_length filled in
    timeout_s: Optional[float] = None   # the replica aborts the engine request past this


@dataclass(frozen=True)
class BlockOutput:
    """One committed block of one request (one SSE chunk)."""
    request_id: str
    delta_text: str                     # text committed by this block
    num_generated: int                  # real generated tokens so far (no masks, no padding)
    nfe: int                            # model forwards so far (hybrid: the drafter's)
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None
    text: Optional[str] = None          # the full text, on the final output only
    num_prompt_tokens: int = 0
    error: Optional[str] = None         # the request was refused: the reason, for the client
    error_status: int = 400             # 400: the engine refused it; 503: the batcher did (full)
    verifier_forwards: int = 0          # hybrid decoding: verifier forwards so far


@dataclass
class ReplicaCounters:
    """Per-replica request totals, reported by /v1/engine/stats next to the engine's own."""
    requests: int = 0
    finished: int = 0
    aborted: int = 0          # closed early: client gone or deadline passed
    failed: int = 0           # refused or failed in the engine (e.g. a knob it does not support)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    nfe: int = 0
    verifier_forwards: int = 0


@dataclass(frozen=True)
class AdmitCall:
    """One ingress replica's call to the batcher (`admitter.py`, `lease_book.py`): it holds
    `holding` admitted engine requests of the model now, and asks to admit `asks` more."""
    ingress_id: str
    holding: int
    asks: int


@dataclass(frozen=True)
class AdmitVerdict:
    admitted: int                       # the first `admitted` of the call's asks may go
    grant: int                          # places this ingress may hold at once from now on
    limit: Optional[int]                # the model's global cap (None: none), for the refusal text
