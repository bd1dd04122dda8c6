"""Memory planning: how many KV pages fit beside the weights and one step's activations.

Pure arithmetic over the model's shape, so the plan for LLaDA-8B on an 80 GB GPU is testable on
a CPU (`tests/engine/test_memory.py`).
"""
from __future__ import annotations

import torch

from ..models.spec import ModelSpec
from .kv_pool import bytes_per_page, num_pages_for_budget

LOGIT_ROWS_PER_SEQ = 64       # decoded positions per request per step we budget logits for


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(spec: ModelSpec, dtype: torch.dtype, max_num_batched_tokens: int,
                     max_num_seqs: int) -> int:
    """Rough peak of one step at the full token budget: a few hidden-size and MLP-width tensors
    per token in flight (residual, norm, q/k/v/o, gate/up/product), plus float32 logits and
    their softmax at the decoded positions only (the LM head never runs on the whole canvas)."""
    per_token = (6 * spec.hidden_size + 3 * spec.intermediate_size) * element_size(dtype)
    logits = 2 * max_num_seqs * LOGIT_ROWS_PER_SEQ * spec.vocab_size * 4
    return max_num_batched_tokens * per_token + logits


def plan_num_pages(spec: ModelSpec, dtype: torch.dtype, page_size: int, total_bytes: int,
                   used_bytes: int, utilization: float, max_num_batched_tokens: int,
                   max_num_seqs: int) -> int:
    """Pages of the KV pool on a device with `total_bytes`, `used_bytes` of it already taken
    (weights, CUDA context), allowed to fill `utilization` of it."""
    budget = (total_bytes * utilization - used_bytes
              - activation_bytes(spec, dtype, max_num_batched_tokens, max_num_seqs))
    page = bytes_per_page(spec.num_layers, page_size, spec.num_kv_heads, spec.head_dim, dtype)
    return num_pages_for_budget(int(budget), page)
