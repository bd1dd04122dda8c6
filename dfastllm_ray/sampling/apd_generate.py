"""The APD reference loop: a diffusion LM drafts left to right, a causal LM verifies.

    out = apd_generate(dream, dream_spec, verifier, prompt, APDParams(...))

Reproduces danielmisrael/apd @ a555561 `DreamGenerationMixin.apd_sample` (REFERENCE_ALGORITHMS.md
section 8) token for token, with the same number of forwards of both models; with
`apd_mixture_weight=None` it is the same loop's `leftright` baseline (k tokens per step, no
verifier). Batch size 1, as the official loop. Each step:

1. the dLLM computes the window [left, right) (apd.apd_window), against its cache of positions
   < left when `diffusion_cache` and `kv_window` are set (the kept K/V are those of earlier
   steps: approximate, as in the official code); logits shifted within the window when the
   drafter's spec says so (Dream);
2. a draft for every masked window row (apd.apd_draft, global RNG unless a generator is given);
3. one verifier forward: a prefill of x[:right] with the draft written in on the first step,
   then only the draft against the verifier's exact cache (models/causal_kv.py);
4. apd.apd_accept_length commits the leading run of the draft that matches the mixture target;
   the verifier cache is truncated to the committed length.

Stops when no mask is left or when the drafter's EOS id appears anywhere in the canvas (prompt
included), as the official loop does; positions after the EOS stay masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.causal_kv import CausalKV
from ..models.spec import ModelSpec
from .apd import APDParams, apd_accept_length, apd_draft, apd_window


@dataclass
class APDOutput:
    sequences: Tensor                # (1, prompt + max_new_tokens) int64; unfilled rows = mask id
    acceptance_counts: list[int]     # tokens committed per step (the official profile's list)
    dream_forwards: int              # drafter forwards (= steps)
    verifier_forwards: int           # verifier forwards (= steps with a verifier, 0 for leftright)

    @property
    def tokens_generated(self) -> int:
        """The official `num_tokens_generated` (leftright counts k even past the canvas end)."""
        return sum(self.acceptance_counts)


@dataclass
class VerifierState:
    """Per-request verifier state between steps: the exact cache of the committed tokens and the
    verifier's logits for the next position (the one output the cache cannot give again)."""
    kv: CausalKV = field(default_factory=CausalKV)
    next_logits: Optional[Tensor] = None          # (1, 1, V): predicts the first draft position


def drafter_logits(model, spec: ModelSpec, x: Tensor, left: int, right: int,
                   kv: Optional[CausalKV]) -> Tensor:
    """Canvas rows [left, right) -> (1, right - left, V) logits, shifted within the window.

    With a cache it is cropped to `left` first; the forward is non-causal (the dLLM's own
    attention), so its queries see the cached positions < left and the whole window."""
    if kv is not None:
        kv.truncate(min(left, kv.length))
    positions = torch.arange(left, right, device=x.device)[None]
    logits = model(x[:, left:right], positions, None, kv)
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if spec.logits_shift else logits


def verifier_logits(verifier, state: VerifierState, x: Tensor, curr: int, right: int,
                    draft: Tensor) -> Tensor:
    """One verifier forward -> (1, n, V): row j predicts draft position curr + j.

    First step: prefill x[:right] with the draft in place, take rows curr-1 .. right-2. Later:
    feed only the draft (the cache holds exactly 0..curr-1) and prepend the saved next_logits."""
    if state.next_logits is None:
        seq = x[:, :right].clone()
        seq[:, curr:right] = draft
        return verifier(seq, kv=state.kv)[:, curr - 1:-1]
    out = verifier(draft[None], kv=state.kv)
    return torch.cat([state.next_logits, out[:, :-1]], dim=1)


def commit_verified(state: VerifierState, v_logits: Tensor, curr: int, n_accept: int) -> None:
    """Drop the rejected draft's K/V; keep the logits for the next first position.

    When every draft token is accepted the official code keeps the LAST row (a prediction for
    the last draft position, not the next one): harmless, the next step's first token is always
    accepted, so that row is never compared. Kept as is."""
    state.kv.truncate(curr + n_accept)
    row = min(n_accept, v_logits.shape[1] - 1)
    state.next_logits = v_logits[:, row:row + 1]


@torch.no_grad()
def apd_generate(dream, dream_spec: ModelSpec, verifier, prompt: Tensor, params: APDParams,
                 generator: Optional[torch.Generator] = None) -> APDOutput:
    """prompt (1, Lp) int64 -> APDOutput. `verifier` may be None for leftright decoding."""
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)} is invalid: APD takes one "
                         "non-empty prompt of shape (1, Lp)")
    if params.apd_mixture_weight is not None and verifier is None:
        raise ValueError("verifier=None is invalid with apd_mixture_weight set: pass the causal "
                         "verifier model, or apd_mixture_weight=None for leftright decoding")
    mask_id, eos = dream_spec.mask_token_id, dream_spec.eos_token_id
    x = F.pad(prompt, (0, params.max_new_tokens), value=mask_id)
    length = x.shape[1]
    use_kv = params.diffusion_cache and params.kv_window is not None
    d_kv = CausalKV() if use_kv else None
    state = VerifierState()
    curr, prev_accept = int(prompt.shape[1]), 0
    out = APDOutput(x, [], 0, 0)
    while curr < length:
        cached = d_kv is not None and out.dream_forwards > 0
        left, right = apd_window(curr, length, params, prev_accept, cached)
        logits = drafter_logits(dream, dream_spec, x, left, right, d_kv)[0]
        out.dream_forwards += 1
        d_logits = logits[x[0, left:right] == mask_id]                     # (n, V), rows curr..
        draft = apd_draft(d_logits, params.temperature, params.top_p, params.top_k, generator)
        if params.apd_mixture_weight is None:
            n_accept = params.tokens_per_step
        else:
            v_logits = verifier_logits(verifier, state, x, curr, right, draft)
            out.verifier_forwards += 1
            n_accept = int(apd_accept_length(draft[None], d_logits[None], v_logits,
                                             params.apd_mixture_weight)[0])
            commit_verified(state, v_logits, curr, n_accept)
        x[0, curr:curr + n_accept] = draft[:n_accept]
        curr, prev_accept = curr + n_accept, n_accept
        out.acceptance_counts.append(n_accept)
        if not bool((x == mask_id).any()) or (eos is not None and bool((x == eos).any())):
            break
    return out
