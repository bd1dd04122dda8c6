"""Diffusion decoding as small pure functions over tensors (docs/DESIGN.md, "The step-level
decoding contract"), plus the two reference loops that reproduce the official samplers.

Only `SamplingParams` (no torch) is imported eagerly: the Serve ingress and batcher validate
requests with it and should not pay for torch. The tensor functions load on first use.
"""
from importlib import import_module

from .params import SamplingParams

_LAZY = {
    "Candidates": "candidates", "dream_generate": "dream_generate",
    "llada_generate": "llada_generate", "add_gumbel_noise": "noise", "POLICIES": "policies",
    "Policy": "policies", "propose": "propose", "get_num_transfer_tokens": "schedule",
    "transfer_counts": "schedule",
}
__all__ = ["SamplingParams", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
