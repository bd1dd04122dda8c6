"""Dream (Dream-v0-Base/Instruct-7B): the Qwen2 layout (GQA, q/k/v biases) run bidirectionally.

Parameter names are the official checkpoint's (`model.layers.{i}.self_attn.q_proj.weight`, ...).
Logits are returned RAW: Dream predicts token p from the hidden state at p-1, and that shift is a
quirk declared on the spec (`logits_shift=True`) and applied by the samplers, never here
(REFERENCE_ALGORITHMS.md section 4).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .layers import (KVHook, RMSNorm, apply_rope, default_positions, gather_rows, hooked_attention,
                     merge_heads, rope_cos_sin, split_heads, swiglu)
from .spec import ModelSpec


def spec_from_config(cfg: dict, tokenizer_ids: dict) -> tuple[ModelSpec, bool]:
    """config.json (DreamConfig / Qwen2 fields) -> (ModelSpec, tie_word_embeddings)."""
    if cfg.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true is not supported: Dream attends "
                         "bidirectionally over the whole canvas")
    heads = cfg["num_attention_heads"]
    return ModelSpec(
        arch="dream",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=cfg.get("max_position_embeddings", 32768),
        qkv_bias=True,
        mask_token_id=cfg["mask_token_id"],
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eot_token_id=tokenizer_ids.get("eot_token_id"),
        logits_shift=True,
    ), bool(cfg.get("tie_word_embeddings", False))


class DreamAttention(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        kv_dim = s.num_kv_heads * s.head_dim
        self.n_heads, self.n_kv = s.num_heads, s.num_kv_heads
        # q/k/v biases: Dream and Qwen2 have them (spec.qkv_bias), Qwen3-style SDAR does not
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, kv_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, kv_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Optional[Tensor],
                kv: Optional[KVHook], layer: int) -> Tensor:
        q = apply_rope(split_heads(self.q_proj(x), self.n_heads), cos, sin)   # (B, H, Lq, D)
        k = apply_rope(split_heads(self.k_proj(x), self.n_kv), cos, sin)      # (B, H_kv, Lq, D)
        v = split_heads(self.v_proj(x), self.n_kv)
        return self.o_proj(merge_heads(hooked_attention(q, k, v, bias, kv, layer)))


class DreamMLP(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class DreamLayer(nn.Module):
    attention_cls = DreamAttention      # SDAR's layers: the same, with Qwen3's q/k norms

    def __init__(self, s: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = self.attention_cls(s)
        self.mlp = DreamMLP(s)

    def forward(self, h, cos, sin, bias, kv, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, bias, kv, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class DreamModel(nn.Module):
    """`model.{embed_tokens, layers, norm}` + `lm_head` as in the official checkpoint."""
    layer_cls = DreamLayer

    def __init__(self, spec: ModelSpec, tie_word_embeddings: bool = False):
        super().__init__()
        self.spec = spec
        self.tie = tie_word_embeddings
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.model.layers = nn.ModuleList(self.layer_cls(spec) for _ in range(spec.num_layers))
        self.model.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv: Optional[KVHook] = None,
                logits_index: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, Lq) -> raw (unshifted) logits (B, Lq or n, V)."""
        positions = default_positions(input_ids) if positions is None else positions
        return self.decode(input_ids, positions, attn_bias, kv, logits_index)

    def decode(self, input_ids: Tensor, positions: Tensor, attn_bias: Optional[Tensor],
               kv: Optional[KVHook], logits_index: Optional[Tensor]) -> Tensor:
        """Embeddings, the layers, the final norm at the `logits_index` rows, the LM head."""
        m = self.model
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta)
        h = m.embed_tokens(input_ids)
        for i, layer in enumerate(m.layers):
            h = layer(h, cos, sin, attn_bias, kv, i)
        h = m.norm(gather_rows(h, logits_index))
        head = m.embed_tokens.weight if self.tie else self.lm_head.weight
        return h @ head.T
