"""The tiny hybrid pair for the API tests: the shipped tiny LLaDA as drafter and a causal verifier
over its tokenizer.

The verifier is the shipped tiny AR model (`dfastllm_ray/assets/tiny-ar`, Qwen2 layout, trained on
the same tokenizer) when it is in the tree and fits the drafter's vocabulary; otherwise a random
tiny Qwen2 folder written here (official parameter names, the drafter's tokenizer files). Its
vocabulary stops below the drafter's mask id, so the verifier can never commit a [MASK].
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dfastllm_ray.models.qwen2 import Qwen2ForCausalLM, spec_from_config
from dfastllm_ray.serve.config import shipped_tiny_model

DRAFTER = Path(shipped_tiny_model())
SHIPPED_AR = DRAFTER.parent / "tiny-ar"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _config(name: str) -> dict:
    return json.loads((Path(name) / "config.json").read_text())


def shipped_verifier() -> Path | None:
    """tiny-ar when it is there and its vocabulary fits the drafter's (the hybrid rule)."""
    if not (SHIPPED_AR / "config.json").exists():
        return None
    fits = _config(SHIPPED_AR)["vocab_size"] <= _config(DRAFTER)["vocab_size"]
    return SHIPPED_AR if fits else None


def random_verifier(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Qwen2ForCausalLM folder: config.json, model.safetensors, tokenizer."""
    drafter = _config(DRAFTER)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
           "vocab_size": drafter["mask_token_id"],       # ids [0, mask): never the mask
           "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128,
           "max_position_embeddings": drafter["max_sequence_length"], "rope_theta": 10000.0,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
           "rope_scaling": None, "eos_token_id": drafter["eos_token_id"],
           "pad_token_id": drafter["pad_token_id"], "torch_dtype": "float32"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    spec, tied = spec_from_config(cfg, {})
    net = Qwen2ForCausalLM(spec, tied)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in net.state_dict().items():
        norm = name.endswith("norm.weight")
        state[name] = (torch.ones_like(p) if norm else
                       torch.zeros_like(p) if name.endswith(".bias") else
                       torch.randn(p.shape, generator=gen) * 0.02).contiguous()
    save_file(state, str(folder / "model.safetensors"))
    for f in TOKENIZER_FILES:
        shutil.copy(DRAFTER / f, folder / f)
    return folder


def verifier_folder(tmp: Path) -> Path:
    return shipped_verifier() or random_verifier(tmp / "tiny-verifier")


# Completion prompts to stream: raw text and trained task prompts in the chat template's text.
STREAM_CANDIDATES = ("Reverse the string: abcdef", "hi there!", "copy rid0yw", "reverse dhmim")


def multi_step_prompt(llm, knobs: dict, max_tokens: int = 16) -> str:
    """The first candidate (raw, then chat-templated) that this pair decodes in two hybrid
    steps or more at temperature 0, so a stream of it must have several chunks."""
    from dfastllm_ray import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **knobs)
    tok = llm.tokenizer
    texts = [*STREAM_CANDIDATES, *(tok.apply_chat_template([{"role": "user", "content": p}],
                                                           add_generation_prompt=True,
                                                           tokenize=False)
                                   for p in STREAM_CANDIDATES)]
    for text in texts:
        if llm.generate([text], params, use_tqdm=False)[0].verifier_forwards >= 2:
            return text
    raise AssertionError(f"no candidate prompt takes two hybrid steps with {knobs}")
