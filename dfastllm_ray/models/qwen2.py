"""Qwen2 causal LM (Qwen2.5-0.5B/1.5B/7B, `Qwen2ForCausalLM`): the AR verifier and baseline.

The layout is Dream's (GQA, q/k/v biases, no o_proj bias, RMSNorm, SwiGLU) with a causal mask:
Dream *is* a Qwen2 run bidirectionally, so the layers are shared with models/dream.py and only
the mask differs. Parameter names are the official checkpoint's; Qwen2.5-0.5B/1.5B tie the LM
head to the embeddings (their safetensors may or may not carry a `lm_head.weight` copy, which is
then ignored, as transformers does), 7B does not. Logits are unshifted: logits[:, i] is the
guess for token i+1 (transformers `Qwen2ForCausalLM`).

Incremental decoding passes a `CausalKV` (models/causal_kv.py) as `kv`: positions then default
to continue after the cached ones, and queries attend to every key at a position <= their own.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .causal_kv import CausalKV
from .dream import DreamModel
from .layers import KVHook, default_positions
from .spec import ModelSpec


def spec_from_config(cfg: dict, tokenizer_ids: dict) -> tuple[ModelSpec, bool]:
    """config.json (transformers Qwen2Config fields) -> (ModelSpec, tie_word_embeddings)."""
    if cfg.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true is not supported: set it to false "
                         "(Qwen2.5 checkpoints ship it false; sliding-window attention is not "
                         "implemented)")
    if cfg.get("rope_scaling"):
        raise ValueError(f"config.json rope_scaling={cfg['rope_scaling']!r} is not supported: "
                         "only plain RoPE (rope_scaling null) is implemented")
    return qwen_spec(cfg, tokenizer_ids, arch="qwen2", qkv_bias=True,
                     mask_token_id=None,             # an AR model has no [MASK]
                     causal=True), bool(cfg.get("tie_word_embeddings", False))


def qwen_spec(cfg: dict, tokenizer_ids: dict, **fields) -> ModelSpec:
    """The fields a transformers Qwen2 / Qwen3 config.json shares (Qwen2, SDAR) -> ModelSpec;
    `fields` give the rest (arch, qkv_bias, mask_token_id, ...)."""
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    return ModelSpec(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        rope_theta=rope_theta(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=cfg.get("max_position_embeddings", 32768),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eot_token_id=tokenizer_ids.get("eot_token_id"),
        **fields)


def rope_theta(cfg: dict) -> float:
    """`rope_theta` (transformers 4.x files), or `rope_parameters` (files written by 5.x)."""
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters={rope!r} is not supported: only plain RoPE "
                         "(rope_type 'default') is implemented")
    return float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def causal_bias(query_pos: Tensor, key_pos: Tensor, dtype: torch.dtype) -> Tensor:
    """query_pos (B, Lq), key_pos (B, Lk) -> additive (B, 1, Lq, Lk): a query at position p sees
    the keys at positions <= p (finfo.min elsewhere, as transformers' causal mask)."""
    allowed = key_pos[:, None, :] <= query_pos[:, :, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=query_pos.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def key_positions(positions: Tensor, kv: Optional[KVHook]) -> Tensor:
    """(B, Lq) -> (B, Lk): the cached positions 0..T-1 of a CausalKV, then this forward's."""
    if kv is None:
        return positions
    if not isinstance(kv, CausalKV):
        raise ValueError(f"kv={type(kv).__name__} needs attn_bias: only a CausalKV (or no cache) "
                         "lets Qwen2ForCausalLM build the causal mask itself; pass the full "
                         "(B, 1, Lq, Lk) mask for other caches")
    past = torch.arange(kv.length, device=positions.device).expand(positions.shape[0], -1)
    return torch.cat((past, positions), dim=1)


class Qwen2ForCausalLM(DreamModel):
    """`model.{embed_tokens, layers, norm}` + `lm_head` (absent when tied), official names:
    Dream's module tree (Dream is a Qwen2 run bidirectionally); only the forward's mask differs."""

    def __init__(self, spec: ModelSpec, tie_word_embeddings: bool = False):
        super().__init__(spec, tie_word_embeddings)
        # a tied checkpoint's lm_head.weight is a copy of the embeddings: the loader skips it
        self.ignored_checkpoint_tensors = ("lm_head.weight",) if tie_word_embeddings else ()

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[KVHook] = None,
                logits_index: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, Lq) -> logits (B, Lq or n, V); logits[:, i] predicts token i+1.

        positions default to 0..Lq-1 after what `kv` holds when it is a CausalKV. attn_bias
        (B, 1, Lq, Lk), when given, is the whole mask (causal included, the engine's paged
        caches); else the causal mask is built from the query and key positions."""
        if positions is None:
            past = kv.length if isinstance(kv, CausalKV) else 0
            positions = default_positions(input_ids) + past
        if attn_bias is None:
            attn_bias = causal_bias(positions, key_positions(positions, kv), torch.float32)
        return self.decode(input_ids, positions, attn_bias, kv, logits_index)
