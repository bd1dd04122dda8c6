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
from torch import Tensor, nn

from .block_kv import ReadOnlyKV
from .causal_kv import CausalKV
from .dream import DreamAttention, DreamMLP
from .layers import (KVHook, RMSNorm, apply_rope, default_positions, gather_rows, hooked_attention,
                     merge_heads, rope_cos_sin, split_heads)
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


def cached_length(kv: Optional[KVHook]) -> int:
    """Positions 0..T-1 already in the cache; the fresh queries and keys come after them."""
    if kv is None:
        return 0
    if isinstance(kv, (CausalKV, ReadOnlyKV)):
        return kv.length
    raise ValueError(f"kv={type(kv).__name__} needs attn_bias and positions: only a CausalKV, a "
                     "ReadOnlyKV (or no cache) lets SDARForCausalLM build its block-causal mask")


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


class SDARLayer(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = SDARAttention(s)
        self.mlp = DreamMLP(s)                                  # the same SwiGLU names

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, bias: Optional[Tensor],
                kv: Optional[KVHook], layer: int) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, bias, kv, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class SDARForCausalLM(nn.Module):
    """`model.{embed_tokens, layers, norm}` + `lm_head`, as in the official checkpoint."""

    def __init__(self, spec: ModelSpec, tie_word_embeddings: bool = False):
        super().__init__()
        if spec.block_size is None:
            raise ValueError("spec.block_size=None is invalid for SDAR: its attention is "
                             "block-causal; build the spec with sdar.spec_from_config")
        self.spec = spec
        self.tie = tie_word_embeddings
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.model.layers = nn.ModuleList(SDARLayer(spec) for _ in range(spec.num_layers))
        self.model.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.ignored_checkpoint_tensors = ("lm_head.weight",) if tie_word_embeddings else ()

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[KVHook] = None,
                logits_index: Optional[Tensor] = None,
                block_size: Optional[int] = None) -> Tensor:
        """input_ids (B, Lq) -> logits (B, Lq or n, V), unshifted.

        positions default to 0..Lq-1 after what a `CausalKV` / `ReadOnlyKV` `kv` holds. attn_bias
        (B, 1, Lq, Lk), when given, is the whole mask; else the block-causal mask is built from the
        query and key positions with `block_size` (default: spec.block_size)."""
        m = self.model
        if positions is None:
            positions = default_positions(input_ids) + cached_length(kv)
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta)
        if attn_bias is None:
            past = torch.arange(cached_length(kv), device=positions.device)
            keys = torch.cat((past.expand(positions.shape[0], -1), positions), dim=1)
            attn_bias = block_causal_mask(positions, keys, block_size or self.spec.block_size)
        h = m.embed_tokens(input_ids)
        for i, layer in enumerate(m.layers):
            h = layer(h, cos, sin, attn_bias, kv, i)
        h = m.norm(gather_rows(h, logits_index))
        head = m.embed_tokens.weight if self.tie else self.lm_head.weight
        return h @ head.T
