"""Diffusion decoding as small pure functions over tensors (docs/DESIGN.md, "The step-level
decoding contract"), plus the two reference loops that reproduce the official samplers.

Only `SamplingParams` (no torch) is imported eagerly: the Serve ingress and batcher validate
requests with it and should not pay for torch. The tensor functions load on first use.
"""
from importlib import import_module

from .params import SamplingParams

# Functions named like their module (propose, llada_generate, dream_generate) are imported from
# the module itself (`from dfastllm_ray.sampling.propose import propose`): once the submodule is
# loaded, the package attribute of that name is the module, not the function.
_LAZY = {
    "Candidates": "candidates", "add_gumbel_noise": "noise", "POLICIES": "policies",
    "Policy": "policies", "get_num_transfer_tokens": "schedule", "transfer_counts": "schedule",
}
__all__ = ["SamplingParams", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
