"""dfastllm-ray: diffusion language models (LLaDA, Dream) served at hardware speed.

`from dfastllm_ray import LLM, SamplingParams` is the offline API; `dfastllm_ray.serve` is the
Ray Serve application.
"""
from .sampling.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in the engine and torch model code; import it on first use only.
    if name == "LLM":
        from .llm import LLM
        return LLM
    raise AttributeError(f"module 'dfastllm_ray' has no attribute {name!r}")
