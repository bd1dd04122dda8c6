"""Ray Serve deployment of the engine behind an OpenAI-compatible API (the only package that
imports Ray or FastAPI). Entry point: `dfastllm_ray.serve.app:build_app`; see docs/serving.md."""
