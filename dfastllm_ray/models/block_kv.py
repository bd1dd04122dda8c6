"""`ReadOnlyKV`: attend to a `CausalKV`'s cached blocks without storing this forward's K/V.

SDAR decodes a block against the K/V of the committed blocks before it (JetAstra/SDAR
`block_diffusion_generate`, REFERENCE_ALGORITHMS.md section 9). The official model takes a
`store_kv` flag per forward:

- `store_kv=True` (the prefill of the whole prompt blocks, and one forward per finished block):
  this forward's K/V are appended to the cache -- exactly what a `CausalKV` hook does;
- `store_kv=False` (every denoising forward): the cached K/V are concatenated in front of this
  forward's and nothing is stored, since the block's tokens are still changing -- this view.

So the two flags are two hooks over one cache: `kv` to store, `ReadOnlyKV(kv)` to only read.
Cached keys are post-RoPE at their absolute positions 0..T-1, as the official `DynamicCache`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .causal_kv import CausalKV


@dataclass(frozen=True)
class ReadOnlyKV:
    cache: CausalKV                 # the committed blocks' K/V, left untouched

    @property
    def length(self) -> int:
        """Cached positions T (0..T-1): this forward's queries sit at T onwards by default."""
        return self.cache.length

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H_kv, Lq, D) fresh -> cached + fresh (B, H_kv, T + Lq, D); nothing is stored."""
        if layer not in self.cache.keys:
            return k, v
        return (torch.cat((self.cache.keys[layer], k), dim=2),
                torch.cat((self.cache.values[layer], v), dim=2))
