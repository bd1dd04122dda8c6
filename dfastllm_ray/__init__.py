"""dfastllm-ray: diffusion language models (LLaDA, Dream) served at hardware speed."""

__version__ = "0.1.0"
