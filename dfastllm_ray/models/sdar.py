"""SDAR (JetAstra/SDAR, `SDARForCausalLM`): a Qwen3 model trained for block diffusion.

The layers are Qwen3's: RMSNorm on q and k per head (over head_dim) before RoPE, GQA, SwiGLU,
no q/k/v biases, an untied LM head. Logits are unshifted: logits[:, i] is the guess for the
token at position i itself (a masked position is predicted from its own hidden state, as in
LLaDA). Parameter names are the official checkpoint's (`model.layers.{i}.self_attn.q_norm.weight`,
...). Forward semantics follow `training/model/SDAR-4B-Chat/modeling_sdar.py` in eval mode
(REFERENCE_ALGORITHMS.md section 9).

Attention is block-causal: with blocks of `block_size` tokens, a query attends to every key of
its own block and of earlier blocks (`spec.block_size`, from config.json; the decoding loop may
pass its own `block_length`). Decoding a block against the cached K/V of earlier blocks uses the
KV hooks of models/block_kv.py: a `CausalKV` stores this forward's K/V (the official
`store_kv=True`), a `ReadOnlyKV` over it only reads (`store_kv=False`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .block_kv import ReadOnlyKV
from .causal_kv import CausalKV
from .dream import DreamAttention, DreamLayer, DreamModel
from .layers import (KVHook, RMSNorm, apply_rope, default_positions, hooked_attention,
                     merge_heads, split_heads)
from .qwen2 import qwen_spec
from .spec import ModelSpec


def spec_from_config(cfg: dict, tokenizer_ids: dict) -> tuple[ModelSpec, bool]:
    """config.json (SDARConfig: Qwen3 fields + `mask_token_id`, `block_size`) -> (spec, tied)."""
    for key, why in (("use_sliding_window", "sliding-window attention is not implemented"),
                     ("attention_bias", "SDAR checkpoints have no q/k/v/o biases"),
                     ("rope_scaling", "only plain RoPE (rope_scaling null) is implemented")):
        if cfg.get(key):
            raise ValueError(f"config.json {key}={cfg[key]!r} is not supported: {why}")
    for key in ("mask_token_id", "block_size"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"config.json {key}={cfg.get(key)!r} is invalid: an SDAR config names "
                             "its integer mask_token_id and block_size")
    spec = qwen_spec(cfg, tokenizer_ids, arch="sdar", qkv_bias=False,
                     mask_token_id=cfg["mask_token_id"], block_size=cfg["block_size"])
    return spec, bool(cfg.get("tie_word_embeddings", False))


def builds_mask(kv: Optional[KVHook]) -> bool:
    """Does the model build the block-causal mask itself (no cache, or the reference's hooks)?"""
    return kv is None or isinstance(kv, (CausalKV, ReadOnlyKV))


def cached_length(kv: Optional[KVHook]) -> int:
    """Positions 0..T-1 already in a reference hook; the fresh queries and keys come after them."""
    return 0 if kv is None else kv.length


def block_causal_mask(query_pos: Tensor, key_pos: Tensor, block_size: int) -> Optional[Tensor]:
    """query_pos (B, Lq), key_pos (B, Lk) -> bool (B, 1, Lq, Lk), True = attend: the key's block
    is the query's or an earlier one (the official `tril(ones(nb, nb))` repeated B times on both
    axes). None when every key is visible: the official eval path then calls flash-attn without a
    mask (its reference stand-in: SDPA without a mask), and so do we, kernel for kernel."""
    allowed = (key_pos[:, None, :] // block_size) <= (query_pos[:, :, None] // block_size)
    return None if bool(allowed.all()) else allowed[:, None]


class SDARAttention(DreamAttention):
    """Dream's projections (no biases: spec.qkv_bias False) plus Qwen3's q/k norms."""

    def __init__(self, s: ModelSpec):
        super().__init__(s)
        self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps)      # Qwen3: per head, before RoPE
        self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Optional[Tensor],
                kv: Optional[KVHook], layer: int) -> Tensor:
        # (B, H, Lq, D) and (B, H_kv, Lq, D): RMSNorm over head_dim, then RoPE
        q = apply_rope(self.q_norm(split_heads(self.q_proj(x), self.n_heads)), cos, sin)
        k = apply_rope(self.k_norm(split_heads(self.k_proj(x), self.n_kv)), cos, sin)
        v = split_heads(self.v_proj(x), self.n_kv)
        return self.o_proj(merge_heads(hooked_attention(q, k, v, bias, kv, layer)))


class SDARLayer(DreamLayer):
    attention_cls = SDARAttention      # the same SwiGLU and norm names as Dream / Qwen2


class SDARForCausalLM(DreamModel):
    """`model.{embed_tokens, layers, norm}` + `lm_head`, as in the official checkpoint."""
    layer_cls = SDARLayer

    def __init__(self, spec: ModelSpec, tie_word_embeddings: bool = False):
        if spec.block_size is None:
            raise ValueError("spec.block_size=None is invalid for SDAR: its attention is "
                             "block-causal; build the spec with sdar.spec_from_config")
        super().__init__(spec, tie_word_embeddings)
        self.ignored_checkpoint_tensors = ("lm_head.weight",) if tie_word_embeddings else ()

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[KVHook] = None,
                logits_index: Optional[Tensor] = None,
                block_size: Optional[int] = None) -> Tensor:
        """input_ids (B, Lq) -> logits (B, Lq or n, V), unshifted.

        positions default to 0..Lq-1 after what a `CausalKV` / `ReadOnlyKV` `kv` holds. attn_bias
        (B, 1, Lq, Lk), when given, is the whole mask; else the block-causal mask is built from the
        query and key positions with `block_size` (default: spec.block_size). With any other KV
        hook (the engine's paged KV) the caller lays the keys out and gives the mask (None: every
        key visible, a block decoded against the earlier blocks), and `positions`."""
        if not builds_mask(kv):          # the engine's paged KV: its mask is the whole mask
            return self.decode(input_ids, positions, attn_bias, kv, logits_index)
        if positions is None:
            positions = default_positions(input_ids) + cached_length(kv)
        if attn_bias is None:
            past = torch.arange(cached_length(kv), device=positions.device)
            keys = torch.cat((past.expand(positions.shape[0], -1), positions), dim=1)
            attn_bias = block_causal_mask(positions, keys, block_size or self.spec.block_size)
        return self.decode(input_ids, positions, attn_bias, kv, logits_index)
