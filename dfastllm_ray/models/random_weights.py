"""A published shape (shapes.py) with random weights, built on the device: no download.

For benchmarks and memory tests of the 7-8B models where no checkpoint is at hand. Weights are
N(0, 0.02) and norms 1, so the model computes at full cost but predicts noise: a confidence
threshold policy then commits about one token per step (benchmarks/scripted_model.py makes
several-token steps on purpose).
"""
from __future__ import annotations

import torch

from .layers import RMSNorm
from .loader import LoadedModel, resolve_device, resolve_dtype
from .registry import ARCHITECTURES
from .shapes import KNOWN_SHAPES, TIED_SHAPES


def random_model(shape: str, device: str = "auto", dtype: str = "auto", seed: int = 0
                 ) -> LoadedModel:
    if shape not in KNOWN_SHAPES:
        raise ValueError(f"shape={shape!r} is unknown: use one of {sorted(KNOWN_SHAPES)}")
    spec = KNOWN_SHAPES[shape]
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with torch.device("meta"):
        net = ARCHITECTURES[spec.arch].model_cls(spec, shape in TIED_SHAPES)
    net = net.to(dt).to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    norms = {id(m.weight) for m in net.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for name, p in net.named_parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return LoadedModel(net.eval().requires_grad_(False), spec, None, {}, None, f"random-{shape}")
