"""A checkpoint's `generation_config.json` as `SamplingParams` defaults.

One function for both front doors (the offline `LLM` and the Serve replica), so a request that
leaves settings out decodes the same way through either.
"""
from __future__ import annotations

from typing import Any

from .params import SamplingParams

# generation_config.json keys taken as request defaults, and their SamplingParams names. `steps`
# is left out on purpose: it belongs to the checkpoint's example length (Dream ships 512), and
# applied to a shorter `max_tokens` it would mean more forwards than tokens.
GENERATION_KEYS = {"max_new_tokens": "max_tokens", "gen_length": "max_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "alg": "alg", "alg_temp": "alg_temp", "eps": "eps"}


def generation_defaults(gen_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams defaults: the checkpoint's generation_config.json, then `overrides` (the
    YAML's `sampling_defaults`). Validated here, so a bad default fails early, naming the field."""
    out = {GENERATION_KEYS[k]: v for k, v in gen_config.items()
           if k in GENERATION_KEYS and v is not None}
    out.update(overrides)
    SamplingParams(**out)
    return out
