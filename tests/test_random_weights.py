"""`models.random_weights`: a published shape built with random weights, norms 1, biases 0."""
import dataclasses

import pytest
import torch

from dfastllm_ray.models import random_weights, shapes
from dfastllm_ray.models.layers import RMSNorm


@pytest.mark.parametrize("name", ["llada-8b", "dream-7b", "qwen2.5-0.5b"])
def test_a_shrunk_published_shape_builds_and_runs(monkeypatch, name):
    small = dataclasses.replace(shapes.KNOWN_SHAPES[name], num_layers=2, hidden_size=64,
                                num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)
    monkeypatch.setitem(shapes.KNOWN_SHAPES, name, small)
    loaded = random_weights.random_model(name, device="cpu", dtype="float32")
    assert loaded.spec is small and loaded.name == f"random-{name}"
    norms = [m.weight for m in loaded.model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(bool((w == 1).all()) for w in norms)
    biases = [p for n, p in loaded.model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == (3 * 2 if small.qkv_bias else 0) and all(not b.any() for b in biases)
    big = max((p for p in loaded.model.parameters() if p.dim() == 2), key=torch.numel)
    assert 0.015 < float(big.detach().std()) < 0.025
    ids = torch.randint(0, 100, (2, 8))
    assert loaded.model(ids).shape == (2, 8, small.vocab_size)
    assert getattr(loaded.model, "tie", False) == (name in shapes.TIED_SHAPES)


def test_unknown_shape_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"shape='llada-80b' is unknown: use one of"):
        random_weights.random_model("llada-80b", device="cpu")
