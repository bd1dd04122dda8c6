"""The explicit architecture registry: config.json -> model class and spec parser.

No auto-import magic: adding an architecture means adding one line to `ARCHITECTURES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import dream, llada, qwen2, sdar
from .spec import ModelSpec


@dataclass(frozen=True)
class Architecture:
    name: str
    model_cls: Callable[..., nn.Module]              # (spec, tied_embeddings) -> module
    spec_from_config: Callable[[dict, dict], tuple[ModelSpec, bool]]
    config_names: tuple[str, ...]                    # model_type / architectures values that select it


ARCHITECTURES: dict[str, Architecture] = {
    "llada": Architecture("llada", llada.LLaDAModel, llada.spec_from_config,
                          ("llada", "LLaDAModelLM")),
    "dream": Architecture("dream", dream.DreamModel, dream.spec_from_config,
                          ("dream", "DreamModel")),
    "qwen2": Architecture("qwen2", qwen2.Qwen2ForCausalLM, qwen2.spec_from_config,
                          ("qwen2", "Qwen2ForCausalLM")),
    "sdar": Architecture("sdar", sdar.SDARForCausalLM, sdar.spec_from_config,
                         ("sdar", "SDARForCausalLM")),
}


def supported() -> list[str]:
    return sorted({n for a in ARCHITECTURES.values() for n in a.config_names})


def architecture_for(cfg: dict, where: str = "config.json") -> Architecture:
    """Pick the architecture from `model_type`, then `architectures`; unknown is a clear error."""
    names = [str(cfg.get("model_type", ""))] + list(cfg.get("architectures") or [])
    for arch in ARCHITECTURES.values():
        wanted = {n.lower() for n in arch.config_names}
        if any(n.lower() in wanted for n in names if n):
            return arch
    raise ValueError(
        f"{where}: model_type={cfg.get('model_type')!r}, architectures={cfg.get('architectures')!r} "
        f"is not a supported diffusion LM. Supported: {', '.join(supported())}. "
        "dfastllm-ray refuses to decode an unknown checkpoint rather than guess its layout.")
