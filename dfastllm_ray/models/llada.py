"""LLaDA (LLaDA-8B-Base/Instruct, LLaDA 1.5): a bidirectional Llama-style mask predictor.

Parameter names are the official checkpoint's (`model.transformer.blocks.{i}.q_proj.weight`, ...),
so `load_state_dict` reads a Hugging Face folder with no renaming. Forward semantics follow
ML-GSAI/LLaDA `modeling_llada.py` (REFERENCE_ALGORITHMS.md section 1): no embedding or logit
scaling, RoPE at absolute positions (left padding does not shift them), padding masks keys only.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .layers import (KVHook, RMSNorm, apply_rope, default_positions, gather_rows, hooked_attention,
                     merge_heads, rope_cos_sin, split_heads, swiglu)
from .spec import ModelSpec


def spec_from_config(cfg: dict, tokenizer_ids: dict) -> tuple[ModelSpec, bool]:
    """config.json (LLaDAConfig fields) -> (ModelSpec, weight_tying).

    tokenizer_ids: special ids found in the tokenizer (bos, eot), since LLaDA's config lacks them."""
    n_heads = cfg["n_heads"]
    d_model = cfg["d_model"]
    if cfg.get("block_type", "llama") != "llama":
        raise ValueError(f"config.json block_type={cfg.get('block_type')!r} is not supported: "
                         "only LLaDA's 'llama' block is implemented")
    return ModelSpec(
        arch="llada",
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        hidden_size=d_model,
        num_layers=cfg["n_layers"],
        num_heads=n_heads,
        num_kv_heads=cfg.get("n_kv_heads") or n_heads,
        head_dim=d_model // n_heads,
        intermediate_size=cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d_model,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=cfg.get("max_sequence_length", 4096),
        qkv_bias=bool(cfg.get("include_qkv_bias") or cfg.get("include_bias")),
        mask_token_id=cfg["mask_token_id"],
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=tokenizer_ids.get("bos_token_id"),
        eot_token_id=tokenizer_ids.get("eot_token_id"),
        logits_shift=False,
    ), bool(cfg.get("weight_tying", False))


class LLaDABlock(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        kv_dim = s.num_kv_heads * s.head_dim
        self.n_heads, self.n_kv, self.spec = s.num_heads, s.num_kv_heads, s
        self.attn_norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.ff_norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.q_proj = nn.Linear(s.hidden_size, s.hidden_size, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, kv_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, kv_dim, bias=s.qkv_bias)
        self.attn_out = nn.Linear(s.hidden_size, s.hidden_size, bias=False)
        self.ff_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)   # SwiGLU gate
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.ff_out = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, bias: Optional[Tensor],
                kv: Optional[KVHook], layer: int) -> Tensor:
        a = self.attn_norm(h)
        q = apply_rope(split_heads(self.q_proj(a), self.n_heads), cos, sin)   # (B, H, Lq, D)
        k = apply_rope(split_heads(self.k_proj(a), self.n_kv), cos, sin)      # (B, H_kv, Lq, D)
        v = split_heads(self.v_proj(a), self.n_kv)
        h = h + self.attn_out(merge_heads(hooked_attention(q, k, v, bias, kv, layer)))
        return h + swiglu(self.ff_norm(h), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModel(nn.Module):
    """`model.transformer.{wte, blocks, ln_f, ff_out}` as in the official checkpoint."""

    def __init__(self, spec: ModelSpec, weight_tying: bool = False):
        super().__init__()
        self.spec = spec
        self.weight_tying = weight_tying
        t = nn.Module()
        t.wte = nn.Embedding(spec.vocab_size, spec.hidden_size)
        t.blocks = nn.ModuleList(LLaDABlock(spec) for _ in range(spec.num_layers))
        t.ln_f = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not weight_tying:
            t.ff_out = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.model = nn.Module()
        self.model.transformer = t

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[KVHook] = None,
                logits_index: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, Lq) -> logits (B, Lq or n, V); see docs/DESIGN.md for the arguments."""
        t = self.model.transformer
        positions = default_positions(input_ids) if positions is None else positions
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta)
        h = t.wte(input_ids)
        for i, block in enumerate(t.blocks):
            h = block(h, cos, sin, attn_bias, kv, i)
        h = t.ln_f(gather_rows(h, logits_index))
        head = t.wte.weight if self.weight_tying else t.ff_out.weight
        return h @ head.T
