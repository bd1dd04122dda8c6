"""KV hooks: how a forward's fresh keys/values combine with cached ones (Fast-dLLM semantics).

A hook is called per layer with this forward's K, V after RoPE, (B, H_kv, Lq, D), and returns the
K, V the queries attend to. Caching post-RoPE keys at their absolute positions equals Fast-dLLM's
"cache pre-RoPE keys, rotate all keys at 0..Lk-1" because each key keeps its own position.
"""
from __future__ import annotations

from torch import Tensor, cat


class Capture:
    """Identity hook that records each layer's K, V of a full-canvas forward."""

    def __init__(self):
        self.layers: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.layers[layer] = (k, v)
        return k, v


class PrefixKV:
    """Fast-dLLM prefix cache: keys = cached positions [0, start) + this forward's (start onwards)."""

    def __init__(self, captured: Capture, start: int):
        self.cache = {i: (k[:, :, :start], v[:, :, :start]) for i, (k, v) in captured.layers.items()}

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        ck, cv = self.cache[layer]
        return cat((ck, k), dim=2), cat((cv, v), dim=2)


class DualKV:
    """Fast-dLLM dual cache: the block [start, end) is fresh, prefix and suffix come from the cache.

    Fast-dLLM writes the block's K, V into the cache in place; the next step overwrites them again,
    so attending to cat(prefix, fresh block, suffix) is the same thing without mutation.
    """

    def __init__(self, captured: Capture, start: int, end: int):
        self.cache = captured.layers
        self.start, self.end = start, end

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        ck, cv = self.cache[layer]
        s, e = self.start, self.end
        return (cat((ck[:, :, :s], k, ck[:, :, e:]), dim=2),
                cat((cv[:, :, :s], v, cv[:, :, e:]), dim=2))
