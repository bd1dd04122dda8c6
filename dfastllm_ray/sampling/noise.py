"""Random draws for diffusion sampling: Gumbel-max noise in float64 and uniform confidences.

Gumbel noise follows ML-GSAI/LLaDA `generate.add_gumbel_noise` (and Fast-dLLM's copy): the
perturbed score is `exp(l) / (-log u)^T` with `u ~ U(0, 1)` drawn in **float64**, whose argmax is a
sample of `softmax(l / T)`. The paper's note is that low-precision Gumbel-max hurts masked
diffusion quality, so the draw and the division stay in float64.

Every draw takes an optional `torch.Generator`: the engine passes one per request (seeded
requests are reproducible whatever else is batched with them); the reference loops pass None and
so draw from the global RNG in the official call order, which is what the seeded fixtures need.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def uniform(shape: Sequence[int], generator: Optional[torch.Generator] = None,
            device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """U[0, 1) of `shape`. With generator=None this is the global-RNG draw that the official
    `torch.rand_like(logits64)` (Gumbel) and `torch.rand((B, L))` (`random` remasking) make."""
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def add_gumbel_noise(logits: Tensor, temperature: float, generator: Optional[torch.Generator] = None,
                     u: Optional[Tensor] = None) -> Tensor:
    """logits (..., V) -> Gumbel-perturbed scores (..., V) float64; argmax samples softmax(logits / T).

    temperature == 0 returns `logits` itself, the same tensor object, not a copy. ML-GSAI
    `generate` relies on that aliasing without saying so: its `confidence_eos_eot_inf` writes -inf
    into the noisy scores and the logits in one chained assignment, so at T == 0 both EOS and EOT
    lose their confidence, at T > 0 only EOT does (propose.py reproduces this).
    u: pre-drawn float64 uniforms of logits' shape (the reference loops draw them for the whole
    canvas, in the official order); drawn from `generator` when None.
    """
    if temperature == 0:
        return logits
    l64 = logits.to(torch.float64)
    if u is None:
        u = uniform(l64.shape, generator, l64.device)
    return l64.exp() / (-torch.log(u)) ** temperature
