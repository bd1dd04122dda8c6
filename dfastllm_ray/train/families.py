"""The four tiny model families as data: config.json, tokenizer flavor and training objective.

* `llada`: LLaDA-8B's config format and parameter names, bidirectional, masked-diffusion loss.
* `dream`: Dream-v0's (Qwen2 layout: GQA, q/k/v biases), bidirectional, masked-diffusion loss on
  logits shifted by one (Dream predicts token p from the hidden state at p-1).
* `ar`: `Qwen2ForCausalLM`, causal, next-token loss; LLaDA's tokenizer flavor (same ids and chat
  template as the tiny LLaDA, whose drafts it verifies).
* `sdar`: `SDARForCausalLM` (Qwen3 layout: q/k RMSNorm per head, no biases), block-causal with
  `block_size` blocks, unshifted logits, block-diffusion loss (block_loss.py); LLaDA's tokenizer
  flavor, so its vocabulary has LLaDA's mask token.

The model class comes from the project's architecture registry, so the trainer builds exactly
what the loader will load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.registry import architecture_for


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer_flavor: str     # a key of tokenizer.FLAVORS
    objective: str            # "diffusion" (masked positions), "block_diffusion" or "next_token"
    logits_shift: bool        # logits[:, p-1] scores token p (Dream)
    config: Callable[[object, dict], dict]      # (TrainConfig, special ids) -> config.json
    residual_names: tuple[str, ...]            # output projections scaled 1/sqrt(2 n_layers)


def llada_config(cfg, ids: dict[str, int]) -> dict:
    """config.json in the official LLaDAConfig format (the fields LLaDA-8B's file has), minus
    `auto_map`: no remote modeling code ships with this folder, and naming some would make
    transformers ask whether to trust it."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": cfg.d_model, "embedding_dropout": 0.0, "embedding_size": ids["vocab_size"],
        "eos_token_id": ids["eos"], "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": ids["mask"], "max_sequence_length": cfg.max_seq,
        "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
        "n_layers": cfg.n_layers, "pad_token_id": ids["eos"], "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True,
        "rope_theta": cfg.rope_theta, "scale_logits": False, "torch_dtype": cfg.save_dtype,
        "use_cache": False, "vocab_size": ids["vocab_size"], "weight_tying": False,
    }


def _qwen2_fields(cfg, ids: dict[str, int]) -> dict:
    """The Qwen2Config fields Dream-v0 and Qwen2.5 configs share."""
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads} (GQA)")
    return {
        "attention_dropout": 0.0, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "hidden_act": "silu", "hidden_size": cfg.d_model, "initializer_range": 0.02,
        "intermediate_size": cfg.mlp_hidden, "max_position_embeddings": cfg.max_seq,
        "max_window_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_kv_heads,
        "pad_token_id": ids["eos"], "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": cfg.rope_theta, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": cfg.save_dtype, "use_cache": False, "use_sliding_window": False,
        "vocab_size": ids["vocab_size"],
    }


def dream_config(cfg, ids: dict[str, int]) -> dict:
    """Dream-v0-Instruct-7B's config.json fields (its `mask_token_id` included), minus `auto_map`."""
    return {**_qwen2_fields(cfg, ids), "architectures": ["DreamModel"], "model_type": "Dream",
            "mask_token_id": ids["mask"]}


def ar_config(cfg, ids: dict[str, int]) -> dict:
    return {**_qwen2_fields(cfg, ids), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


def sdar_config(cfg, ids: dict[str, int]) -> dict:
    """config.json in the official SDARConfig format (Qwen3's fields + `block_size`,
    `mask_token_id`; the fields of the official config in tests/fixtures/sdar/sdar-tiny), minus
    `auto_map` (no remote code ships) and `transformers_version`."""
    return {**_qwen2_fields(cfg, ids), "architectures": ["SDARForCausalLM"], "model_type": "sdar",
            "attention_bias": False, "head_dim": cfg.d_model // cfg.n_heads,
            "fuse_cross_entropy": False, "block_size": cfg.block_size,
            "mask_token_id": ids["mask"]}


QWEN2_RESIDUAL = ("o_proj.weight", "down_proj.weight")
FAMILIES = {
    "llada": Family("llada", "llada", "diffusion", False, llada_config,
                    ("attn_out.weight", "ff_out.weight")),
    "dream": Family("dream", "dream", "diffusion", True, dream_config, QWEN2_RESIDUAL),
    "ar": Family("ar", "llada", "next_token", False, ar_config, QWEN2_RESIDUAL),
    "sdar": Family("sdar", "llada", "block_diffusion", False, sdar_config, QWEN2_RESIDUAL),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"family={name!r} is unknown: choose from {list(FAMILIES)}")
    return FAMILIES[name]


def build_model(fam: Family, config: dict, ids: dict[str, int], seed: int) -> nn.Module:
    """The registry's model for config.json, initialised N(0, 0.02) from `seed` (residual
    output projections scaled by 1/sqrt(2 * n_layers), GPT-2 style; biases 0, norms 1)."""
    arch = architecture_for(config)
    spec, tied = arch.spec_from_config(config, {"bos_token_id": ids["bos"],
                                                "eot_token_id": ids["eot"]})
    model = arch.model_cls(spec, tied)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * spec.num_layers) if name.endswith(fam.residual_names) \
                    else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
