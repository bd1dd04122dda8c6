"""Plain autoregressive decoding with a causal LM and its exact KV cache: the AR baseline.

    out = ar_generate(model, spec, prompt, max_new_tokens, temperature, generator)

The reference the hybrid loops are judged against: speculative drafting at temperature 0 must
return exactly these tokens, and at temperature > 0 tokens distributed as these. One forward
per token after a prefill of the prompt; stops after a stop token of the spec (EOS / EOT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..models.causal_kv import CausalKV
from ..models.spec import ModelSpec


@dataclass
class AROutput:
    tokens: list[int]                # generated ids, the stop token included when one was hit
    forwards: int                    # model forwards (prefill included)


def target_probs(logits: Tensor, temperature: float) -> Tensor:
    """(..., V) logits -> (..., V) float64 probabilities; temperature 0 is the one-hot argmax,
    so greedy decoding is the temperature-0 case of the same sampler."""
    if temperature == 0:
        return torch.zeros(logits.shape, dtype=torch.float64, device=logits.device).scatter_(
            -1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits.double() / temperature, dim=-1)


def sample_from(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw: probs (..., V) (need not sum to 1), u (...) in [0, 1) -> (...) int64.

    Never returns a zero-probability token: the first index whose cumulative mass exceeds
    u * total, with u kept off 0."""
    cum = probs.cumsum(-1)
    level = u.clamp_min(torch.finfo(torch.float64).tiny)[..., None] * cum[..., -1:]
    return (cum < level).sum(-1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def ar_generate(model, spec: ModelSpec, prompt: Tensor, max_new_tokens: int,
                temperature: float = 0.0, generator: Optional[torch.Generator] = None) -> AROutput:
    """prompt (1, Lp) int64 -> AROutput; temperature 0 is greedy (no random draw)."""
    kv, out = CausalKV(), AROutput([], 0)
    logits = model(prompt, kv=kv)[:, -1]                       # (1, V)
    out.forwards += 1
    while len(out.tokens) < max_new_tokens:
        probs = target_probs(logits, temperature)
        u = torch.rand(1, dtype=torch.float64, generator=generator) if temperature > 0 else \
            torch.zeros(1, dtype=torch.float64)
        token = int(sample_from(probs, u.to(probs.device))[0])
        out.tokens.append(token)
        if token in spec.stop_token_ids or len(out.tokens) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=prompt.device), kv=kv)[:, -1]
        out.forwards += 1
    return out
