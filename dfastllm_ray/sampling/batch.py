"""`RowKnobs` / `GroupFacts`: what the batched sampler reads, per row on the device, per group on the host.

The batched sampler (batch_propose.py, batch_policies.py) decides for every request of a forward
group at once. Each request's knobs are one row of small device tensors (gathered from the
engine's slot table), so a policy is a few tensor ops over (B, n) whatever B is. What the host
knows about the whole group without looking at the device (`GroupFacts`: which policies are
present, whether any row samples, which confidences are read) only chooses which ops run: it
never branches per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Dream's confidence kinds (`sample_tokens`): token probability, top1 - top2, negative entropy
CONF_PROB, CONF_MARGIN, CONF_NEG_ENTROPY = 0, 1, 2


@dataclass
class RowKnobs:
    """Per-row decoding inputs of one group, all on the device. B rows, n candidate slots."""
    positions: Tensor          # (B, n) int64 canvas positions of the candidates (padding: any)
    valid: Tensor              # (B, n) bool: a real candidate (masked, in the row's range)
    rng_keys: Tensor           # (B, n) int64 counter-RNG keys: (request seed, its step, position)
    k: Tensor                  # (B,) int64 commit count of top-k style policies (0: commit none)
    prob: Tensor               # (B,) float Dream origin's per-position unmask probability
    temperature: Tensor        # (B,) float, 0 = greedy
    temp_div: Tensor           # (B, 1, 1) float: temperature where > 0, else 1 (logits divisor)
    hot: Tensor                # (B, 1) bool: temperature > 0 (the row samples its tokens)
    threshold: Tensor          # (B,) float (NaN where unset)
    factor: Tensor             # (B,) float
    entropy_bound: Tensor      # (B,) float, nats
    alg_temp: Tensor           # (B,) float
    top_p: Tensor              # (B,) float, 1 = off
    top_k: Tensor              # (B,) int64, 0 = off
    random_remask: Tensor      # (B,) bool LLaDA remasking="random"
    logits_eos_inf: Tensor     # (B,) bool
    conf_eos_eot_inf: Tensor   # (B,) bool
    conf_alg: Tensor           # (B,) int64 CONF_* (Dream)
    policy: Tensor             # (B,) int64 index into the group's `GroupFacts.policies`


@dataclass
class GroupFacts:
    """Host-side facts of one group (no device read): which op chains the group needs."""
    family: str                                  # "llada" | "dream": the proposal rule
    policies: tuple[str, ...]                    # distinct policy names present, in id order
    sampled: bool = False                        # some row has temperature > 0
    random_remask: bool = False
    logits_eos_inf: bool = False
    conf_eos_eot_inf: bool = False
    top_p: bool = False
    top_k: bool = False
    conf_algs: frozenset = field(default_factory=frozenset)   # CONF_* present (Dream)
    conf_dtype: torch.dtype = torch.float32      # softmax / confidence precision

    @property
    def needs_entropy(self) -> bool:
        return "entropy_bound" in self.policies
