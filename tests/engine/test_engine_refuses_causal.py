"""The diffusion engine refuses a causal LM (no mask token) with a message saying what to do."""
from pathlib import Path

import pytest

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.models.loader import load_model

VERIFIER = Path(__file__).parents[1] / "fixtures" / "apd" / "apd-tiny" / "verifier"


def test_engine_refuses_a_causal_model():
    loaded = load_model(VERIFIER, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="causal LM with no mask token"):
        Engine(loaded, EngineConfig(num_pages=8))
