"""Layers shared by LLaDA and Dream: RMSNorm, rotary embeddings, bidirectional attention, SwiGLU.

Both official models are Llama-style pre-norm transformers with *no* causal mask. The numerics
follow the official code where they change results: RMSNorm statistics in float32, RoPE applied in
float32 (LLaDA's `rope_full_precision`), `rotate_half` over two contiguous halves.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# kv(layer, k, v) -> (k_all, v_all): see models/kv_hooks.py. k, v: (B, H_kv, Lq, D) after RoPE.
# A hook may instead compute the attention itself: kv.attend(layer, q, k, v, bias) -> (B, H, Lq, D)
# (the engine's paged FlexAttention reads the pool in place); see `hooked_attention`.
KVHook = Callable[[int, Tensor, Tensor], "tuple[Tensor, Tensor]"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # float32 statistics, cast back, then scale: LLaDA RMSLayerNorm and Qwen2RMSNorm agree on this
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, L) int64 -> cos, sin (B, 1, L, head_dim) float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float) / head_dim))
    freqs = positions.float()[..., None] * inv_freq          # (B, L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, L, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D); rotation in float32, result in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def default_positions(input_ids: Tensor) -> Tensor:
    b, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).expand(b, length)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Bidirectional attention. q (B, H, Lq, D); k, v (B, H_kv, Lk, D); bias (B, 1, Lq|1, Lk)
    additive, or bool (True = attend), or None (every key visible: SDPA may pick its flash kernel).

    GQA natively (`enable_gqa`): KV head j serves query heads j*g .. j*g+g-1, as LLaDA's
    repeat_interleave and Qwen2's repeat_kv lay them out, without materialising the copies.
    """
    if bias is not None and bias.dtype != torch.bool:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False,
                                          enable_gqa=q.shape[1] != k.shape[1])


def hooked_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                     kv: Optional[KVHook], layer: int) -> Tensor:
    """A block's attention with its KV hook: the hook's own `attend` when it has one, else the
    hook's keys/values (B, H_kv, Lk, D) through `attention`. q (B, H, Lq, D) -> (B, H, Lq, D)."""
    if kv is None:
        return attention(q, k, v, bias)
    if hasattr(kv, "attend"):
        return kv.attend(layer, q, k, v, bias)
    k, v = kv(layer, k, v)
    return attention(q, k, v, bias)


def key_padding_bias(key_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """key_mask (B, Lk) 1 = real token, 0 = padding -> additive bias (B, 1, 1, Lk).

    Same as the official LLaDA mask: finfo.min on padded keys, nothing on padded queries.
    """
    return (1.0 - key_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


def pair_mask_bias(key_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dream's padding mask: (B, L) -> (B, 1, L, L) additive, pads neither attend nor are attended.

    Fully masked pad query rows come out of SDPA as garbage-but-finite; callers never read them.
    """
    m = key_mask.bool()
    allowed = m[:, None, None, :] & m[:, None, :, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def swiglu(x: Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> Tensor:
    return down(F.silu(gate(x)) * up(x))


def gather_rows(h: Tensor, index: Optional[Tensor]) -> Tensor:
    """h (B, L, C), index (B, n) -> (B, n, C): run the LM head only where logits are needed."""
    if index is None:
        return h
    return h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)"""
    b, length, _ = x.shape
    return x.view(b, length, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H*D)"""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)
