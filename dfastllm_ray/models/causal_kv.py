"""`CausalKV`: the exact KV cache of a causal model, as plain tensors (append, truncate).

A causal model's K/V at position p depend only on tokens 0..p, so caching them is exact (unlike
the approximate Fast-dLLM caches of the diffusion models): feeding the next tokens against the
cache gives the same logits as a full forward. Speculative and APD verification append a draft
and, on reject, truncate back to the accepted length; the engine will map the same two
operations onto its page pool (append = write pages, truncate = return pages).

It is a KV hook (models/layers.py `KVHook`): the model calls it per layer with this forward's
post-RoPE K, V and attends to what it returns. All batch rows share one length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class CausalKV:
    keys: dict[int, Tensor] = field(default_factory=dict)     # layer -> (B, H_kv, T, D), post-RoPE
    values: dict[int, Tensor] = field(default_factory=dict)   # layer -> (B, H_kv, T, D)

    @property
    def length(self) -> int:
        """Cached positions T: they are 0..T-1, so the next token goes at position T."""
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this forward's (B, H_kv, Lq, D) at positions T..T+Lq-1; return all keys/values."""
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def truncate(self, length: int) -> None:
        """Keep positions 0..length-1 (a rejected draft's K/V are dropped)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate(length={length}) is invalid: the cache holds {self.length} "
                             "positions; pass 0 <= length <= that")
        for layer in self.keys:
            self.keys[layer] = self.keys[layer][:, :, :length]
            self.values[layer] = self.values[layer][:, :, :length]
