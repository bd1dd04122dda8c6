"""A tiny SDAR (block diffusion) folder for the API tests, over the shipped tiny LLaDA's tokenizer.

The shipped trained `dfastllm_ray/assets/tiny-sdar` when it is in the tree; otherwise a random
2-layer `SDARForCausalLM` written here in the official format (config.json with `block_size` and
`mask_token_id`, official parameter names, the tiny LLaDA's tokenizer files, so ids and the chat
template are the same). Random weights decode noise, which is all the API path needs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dfastllm_ray.models.sdar import SDARForCausalLM, spec_from_config
from tiny_pair import DRAFTER, TOKENIZER_FILES

SHIPPED = DRAFTER.parent / "tiny-sdar"
BLOCK = 4


def sdar_folder(tmp: Path, seed: int = 0) -> Path:
    if (SHIPPED / "config.json").exists():
        return SHIPPED
    return random_sdar(tmp / "tiny-sdar", seed)


def random_sdar(folder: Path, seed: int = 0) -> Path:
    llada = json.loads((DRAFTER / "config.json").read_text())
    cfg = {"architectures": ["SDARForCausalLM"], "model_type": "sdar",
           "vocab_size": llada["vocab_size"], "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "intermediate_size": 128, "max_position_embeddings": llada["max_sequence_length"],
           "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "use_sliding_window": False, "rope_scaling": None, "attention_bias": False,
           "block_size": BLOCK, "mask_token_id": llada["mask_token_id"],
           "eos_token_id": llada["eos_token_id"], "pad_token_id": llada["pad_token_id"],
           "torch_dtype": "float32"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    spec, tied = spec_from_config(cfg, {})
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in SDARForCausalLM(spec, tied).state_dict().items():
        state[name] = (torch.ones_like(p) if name.endswith("norm.weight")
                       else torch.randn(p.shape, generator=gen) * 0.02).contiguous()
    save_file(state, str(folder / "model.safetensors"))
    for f in TOKENIZER_FILES:
        shutil.copy(DRAFTER / f, folder / f)
    return folder
