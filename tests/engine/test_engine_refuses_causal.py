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


@pytest.mark.parametrize("knob", [{"credit_alpha": 0.5}])
def test_reference_only_policies_are_refused_at_admission(knob):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_models import engine
    from dfastllm_ray.sampling.params import SamplingParams
    eng = engine("llada-tiny", "dual")
    with pytest.raises(ValueError, match=list(knob)[0]):
        eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=8, **knob))
    assert not eng.has_unfinished()


def test_engine_refuses_a_verifier_that_is_not_causal():
    """A diffusion model as the verifier (here the drafter itself) would be run with a causal
    mask and an append-only cache it was not trained for: refused, naming the fix."""
    drafter = load_model(VERIFIER.parent / "dream", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="is not a causal LM: hybrid decoding"):
        Engine(drafter, EngineConfig(num_pages=8), verifier=drafter)
