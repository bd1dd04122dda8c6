"""What the engine accepts from a block-diffusion model (SDAR) and how a request's knobs resolve.

A block-causal model decodes each block against the stored K/V of the earlier ones
(`block_plan.py`), so it needs the KV pool and the SDPA path (the mask of its multi-block
prefill is built in `step_inputs`). Its knobs are the official `block_diffusion_generate`'s:
`block_length` (default: the checkpoint's `block_size`), `steps` (here, as for every model,
the forwards budget of the whole generation: `steps // blocks` denoising steps per block, at
most B), `remasking_strategy`, `threshold` (its `confidence_threshold`), `temperature`, `top_k`,
`top_p`. `steps` above one per position is refused; below one per block it is raised to one.
Temperature 0 takes the argmax (the official sampler has no greedy mode: `top_k=1` is
its greedy form, and it is served too).
"""
from __future__ import annotations

import math
from dataclasses import replace

from ..sampling.params import (DEFAULT_MAX_TOKENS, FOREIGN, SDAR_THRESHOLD, SamplingParams,
                               unused_knobs)
from .config import EngineConfig

DEFAULT_STRATEGY = "low_confidence_dynamic"     # the official default


def check_block_diffusion(name: str, config: EngineConfig, verifier) -> None:
    """Refuse, by field, the engine settings a block-causal model cannot run under."""
    if config.kv_cache_mode == "none":
        raise ValueError(f"kv_cache_mode='none' is invalid for {name!r}: a block-diffusion model "
                         "decodes each block against the stored K/V of the earlier ones; use "
                         "'prefix' or 'dual' (either gives it the KV pool it needs)")
    if config.attention_backend != "sdpa":
        raise ValueError(f"attention_backend={config.attention_backend!r} is invalid for {name!r}: "
                         "its block-causal prefill mask is built for the SDPA path; use 'sdpa'")
    if config.cuda_graphs:
        raise ValueError(f"cuda_graphs=True is invalid for {name!r}: the graph runner replays "
                         "full-attention windows only; set cuda_graphs=False")
    if verifier is not None:
        raise ValueError(f"{name!r} is a block-diffusion model: hybrid decoding (a verifier) is "
                         "built for full-attention drafters; drop the verifier")


def resolve_block_diffusion(params: SamplingParams, prompt_len: int, block_size: int,
                            max_len: int) -> SamplingParams:
    """Fill SDAR's defaults and lay the canvas out: blocks of B from position 0, up to B-1
    positions past prompt + max_tokens decoded too (the official canvas), the output cut at
    max_tokens (`output_limit`). `block_size`: the checkpoint's. Resolving a resolved request
    again changes nothing (the Serve ingress resolves, then the engine)."""
    _refuse_foreign(params)
    block = params.block_length or block_size
    strategy = params.remasking_strategy or DEFAULT_STRATEGY
    if params.threshold is not None and strategy != "low_confidence_dynamic":
        raise ValueError(f"threshold={params.threshold} applies to remasking_strategy "
                         f"'low_confidence_dynamic' only (this request: {strategy!r}): drop it")
    gen = params.output_limit or params.max_tokens or DEFAULT_MAX_TOKENS
    end = math.ceil((prompt_len + gen) / block) * block
    if end > max_len:
        room = max(max_len // block * block - prompt_len, 0)
        raise ValueError(f"max_tokens={gen} is invalid: the prompt ({prompt_len} tokens) and "
                         f"max_tokens, rounded up to whole blocks of {block}, must fit the context "
                         f"of {max_len} tokens: at most {room}")
    blocks = (end - prompt_len // block * block) // block
    if params.steps is not None and params.steps > blocks * block:
        raise ValueError(f"steps={params.steps} is invalid: at most {blocks * block} (one "
                         f"denoising step per position: {blocks} blocks of {block} for this prompt "
                         "and max_tokens)")
    per_block = max(1, (params.steps or blocks * block) // blocks)     # rounded down, >= 1
    return replace(params, max_tokens=end - prompt_len, block_length=block,
                   steps=per_block * blocks, remasking_strategy=strategy,
                   threshold=(params.threshold or SDAR_THRESHOLD)
                   if strategy == "low_confidence_dynamic" else None,
                   output_limit=gen if gen < end - prompt_len else None)


def _refuse_foreign(params: SamplingParams) -> None:
    """Knobs of the other families, cache and speed settings: a named refusal, never ignored."""
    foreign = unused_knobs({k: getattr(params, k) for k in FOREIGN["sdar"]}, "sdar")
    if foreign:
        raise ValueError(f"{foreign[0]}={getattr(params, foreign[0])!r} is a LLaDA / Dream knob; "
                         "SDAR (block diffusion) decodes with remasking_strategy / threshold / "
                         "steps / temperature / top_k / top_p (refused, not ignored)")
    if params.is_hybrid:
        raise ValueError(f"decoding={params.decoding!r} is invalid for a block-diffusion model: "
                         "hybrid decoding needs a full-attention drafter; use 'diffusion'")
    for name in ("speed", "kv_cache_mode", "refresh_every", "refresh_on", "refresh_budget"):
        if getattr(params, name) is not None:
            raise ValueError(f"{name}={getattr(params, name)!r} is invalid for a block-diffusion "
                             "model: it decodes each block against the stored earlier blocks "
                             "(no refresh, no speed dial yet); leave it out")
