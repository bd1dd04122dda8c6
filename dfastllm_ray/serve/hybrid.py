"""Hybrid diffusion-AR request fields (`decoding: apd | speculative`, docs/hybrid.md) at the ingress.

A model serves them only when its config names a `verifier` (the card carries its source); any
hybrid field on another model is a 400 naming it, before any queue. A hybrid request commits
left to right as the drafter and the verifier agree, so the diffusion schedule knobs (steps,
block length, thresholds, policy knobs) mean nothing for it: set by the request they are a 400,
set as model defaults they are dropped (so are default APD knobs on a speculative or diffusion
request, and the reverse: a config may default to APD and still serve the others).
"""
from __future__ import annotations

from typing import Any

from dfastllm_ray.sampling.params import HYBRID_KNOBS, POLICY_KNOBS

from .errors import bad_request
from .protocol import HYBRID_FIELDS
from .records import ModelCard

# Diffusion-schedule fields a hybrid request does not read.
SCHEDULE_FIELDS = ("steps", "block_length", "threshold", "exit_low", "kl_history", *POLICY_KNOBS)


def is_hybrid(fields: dict[str, Any]) -> bool:
    return fields.get("decoding", "diffusion") not in (None, "diffusion")


def hybrid_fields(overrides: dict[str, Any], card: ModelCard) -> dict[str, Any]:
    """Model defaults < the request's fields, checked for hybrid decoding; the merged fields."""
    asked = [k for k in HYBRID_FIELDS if k in overrides
             and not (k == "decoding" and overrides[k] == "diffusion")]
    if asked and card.verifier is None:
        name = asked[0]
        raise bad_request(f"{name}={overrides[name]!r} is invalid: model {card.model_id!r} has no "
                          "verifier, so it serves diffusion decoding only (hybrid APD / "
                          "speculative decoding needs `verifier` in the model's config); leave "
                          f"{name} out.", param=name)
    fields = {**card.defaults, **overrides}
    decoding = fields.get("decoding") or "diffusion"
    for name, mode in HYBRID_KNOBS.items():     # a default for another decoding: dropped
        if name not in overrides and mode != decoding:
            fields.pop(name, None)
    if not is_hybrid(fields):
        return fields
    for name in SCHEDULE_FIELDS:
        if name in overrides:
            raise bad_request(f"{name}={overrides[name]!r} is invalid: decoding="
                              f"{fields['decoding']!r} commits left to right as the drafter and "
                              f"the verifier agree, and does not read {name} (a diffusion "
                              "schedule knob); leave it out, or use decoding='diffusion'.",
                              param=name)
        fields.pop(name, None)
    return fields
