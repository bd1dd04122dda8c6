"""Memory planning: how many KV pages fit beside the weights and one step's activations.

On CUDA the activations are *measured* before the pool exists (nano-vllm's `warmup_model` +
`allocate_kv_cache`): one warm-up step at the largest shape the config allows runs with the
allocator's peak counter reset, and the pool gets what is left of `gpu_memory_utilization`
of the device after the weights, the CUDA context and that peak (`measure_and_plan`).
`plan_num_pages` is the arithmetic fallback: an *estimate* of the same peak from the model's
shape, for planning without a GPU (CPU, or a device other than CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

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
    (weights, CUDA context), allowed to fill `utilization` of it; activations estimated."""
    budget = (total_bytes * utilization - used_bytes
              - activation_bytes(spec, dtype, max_num_batched_tokens, max_num_seqs))
    page = bytes_per_page(spec.num_layers, page_size, spec.num_kv_heads, spec.head_dim, dtype)
    return num_pages_for_budget(int(budget), page)


# ---- measured (CUDA) ----------------------------------------------------------------------------
def warmup_shapes(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
                  ) -> list[tuple[int, int]]:
    """(rows, width) of the largest steps the config allows, both within the token budget:
    the most rows (`max_num_seqs` refreshes, canvases as long as the budget lets them all be:
    the most logits) and the longest rows (as many `max_model_len` canvases as fit: the widest
    attention). Usually they coincide."""
    width = max(1, min(max_model_len, max_num_batched_tokens // max_num_seqs))
    longest = min(max_model_len, max_num_batched_tokens)
    rows = max(1, min(max_num_seqs, max_num_batched_tokens // longest))
    return list(dict.fromkeys([(max_num_seqs, width), (rows, longest)]))


@torch.inference_mode()
def warmup_step(model: torch.nn.Module, spec: ModelSpec, device: torch.device, rows: int,
                width: int, conf_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One forward over `rows` canvases of `width` mask tokens -> confidences (rows, n).

    No KV hook: a refresh's activations are those of this forward (its K/V go into the
    preallocated pool in place). The LM head runs at `LOGIT_ROWS_PER_SEQ` rows per canvas (the
    engine decodes only the candidates), and the sampler's widest temporaries follow: logits
    cast to `conf_dtype` and their softmax over the vocabulary (sampling/batch_propose.py)."""
    ids = torch.full((rows, width), spec.mask_token_id, dtype=torch.long, device=device)
    n = min(width, LOGIT_ROWS_PER_SEQ)
    index = torch.arange(width - n, width, device=device).expand(rows, n)
    logits = model(ids, logits_index=index)                                 # (rows, n, V)
    return torch.softmax(logits.to(conf_dtype), dim=-1).amax(dim=-1)


@dataclass(frozen=True)
class MemoryPlan:
    """What the warm-up measured and what the pool got (bytes unless said otherwise)."""
    total: int                # the device's memory
    used: int                 # taken before the pool: CUDA context, weights, allocator cache
    activation_peak: int      # the warm-up step's peak above what was allocated before it
    rows: int                 # warm-up shape: canvases ...
    width: int                # ... of this many tokens
    page_bytes: int
    num_pages: int            # pages the budget allows (before the engine's useful cap)

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes


def pages_after_warmup(total: int, used: int, activation_peak: int, utilization: float,
                       page_bytes: int) -> int:
    """nano-vllm's rule: the pool gets utilization x total, less what is used now, less the
    step's measured activation peak."""
    return num_pages_for_budget(int(total * utilization - used - activation_peak), page_bytes)


def measure_and_plan(model: torch.nn.Module, spec: ModelSpec, dtype: torch.dtype,
                     device: torch.device, page_size: int, utilization: float,
                     max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                     conf_dtype: torch.dtype = torch.float32) -> MemoryPlan:
    """CUDA only: run the warm-up steps with the peak counter reset, then size the pool."""
    if device.type != "cuda":
        raise ValueError(f"measure_and_plan needs a CUDA device, got {device}: use "
                         "plan_num_pages (the arithmetic estimate) elsewhere")
    peaks = {shape: _peak_of(model, spec, device, *shape, conf_dtype)
             for shape in warmup_shapes(max_num_seqs, max_num_batched_tokens, max_model_len)}
    (rows, width), peak = max(peaks.items(), key=lambda kv: kv[1])
    torch.cuda.empty_cache()                   # the warm-up's blocks back to the device
    free, total = torch.cuda.mem_get_info(device)
    page = bytes_per_page(spec.num_layers, page_size, spec.num_kv_heads, spec.head_dim, dtype)
    return MemoryPlan(total=total, used=total - free, activation_peak=peak, rows=rows,
                      width=width, page_bytes=page,
                      num_pages=pages_after_warmup(total, total - free, peak, utilization, page))


def _peak_of(model: torch.nn.Module, spec: ModelSpec, device: torch.device, rows: int, width: int,
             conf_dtype: torch.dtype) -> int:
    """Bytes the warm-up step at (rows, width) allocates above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        warmup_step(model, spec, device, rows, width, conf_dtype)
    except torch.cuda.OutOfMemoryError as e:
        raise ValueError(f"the warm-up step of {rows} canvases x {width} tokens (the largest the "
                         "config allows) does not fit on the device beside the weights: lower "
                         "EngineConfig.max_num_seqs, max_num_batched_tokens or max_model_len"
                         ) from e
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
