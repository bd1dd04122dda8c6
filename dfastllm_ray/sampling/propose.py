"""`propose`: what one step would write at each masked position, and how sure it is.

The first half of the step-level contract (docs/DESIGN.md): given the logits at the `n` masked
positions of one request's active block, return a `Candidates` (token, confidence, entropy per
position). The second half, which positions to commit, is a policy from `policies.py`.

LLaDA-style proposals follow ML-GSAI/LLaDA `generate` and Fast-dLLM `get_transfer_index`:
the token is the argmax of Gumbel-perturbed logits (float64 noise, noise.py) and the confidence is
the noise-free softmax probability of that token (`remasking='low_confidence'`) or a uniform draw
(`'random'`). The two official codes differ only in the softmax precision: ML-GSAI takes it in the
logits' dtype (float32), Fast-dLLM in float64 -- `conf_dtype` picks one. When `params.alg` is set
the proposal is Dream's `sample_tokens` (sampling/dream.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .candidates import Candidates
from .dream import propose_dream
from .noise import add_gumbel_noise, uniform
from .params import SamplingParams

if TYPE_CHECKING:
    from ..models.spec import ModelSpec


def propose(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
            *, spec: Optional["ModelSpec"] = None, conf_dtype: torch.dtype = torch.float64,
            gumbel_u: Optional[Tensor] = None, conf_u: Optional[Tensor] = None) -> Candidates:
    """logits (n, V) at the masked positions (Dream: already shifted) -> Candidates of length n.

    spec: supplies the EOS/EOT ids for `logits_eos_inf` / `confidence_eos_eot_inf`.
    conf_dtype: softmax (and `random` draw) precision: float32 = ML-GSAI `generate`,
      float64 = Fast-dLLM (the default; the engine uses it).
    gumbel_u (n, V) float64, conf_u (n,): pre-drawn uniforms. The reference loops draw them over
      the whole canvas from the global RNG, in the official order, and pass the masked rows here;
      the engine leaves them None and `generator` is used.
    """
    if params.alg is not None:
        return propose_dream(logits, params, generator)
    return propose_llada(logits, params, generator, spec=spec, conf_dtype=conf_dtype,
                         gumbel_u=gumbel_u, conf_u=conf_u)


def propose_llada(logits: Tensor, params: SamplingParams,
                  generator: Optional[torch.Generator] = None, *,
                  spec: Optional["ModelSpec"] = None, conf_dtype: torch.dtype = torch.float64,
                  gumbel_u: Optional[Tensor] = None, conf_u: Optional[Tensor] = None) -> Candidates:
    """ML-GSAI `generate` / Fast-dLLM `get_transfer_index`, one request: (n, V) -> Candidates."""
    t = params.temperature
    if params.logits_eos_inf:                                   # never predict EOS
        logits = _with_neg_inf(logits, [_special(spec, "eos_token_id", "logits_eos_inf")])
    tokens = add_gumbel_noise(logits, t, generator, gumbel_u).argmax(dim=-1)   # (n,) int64
    if params.remasking == "random":
        conf = conf_u if conf_u is not None else uniform(tokens.shape, generator, logits.device,
                                                         conf_dtype)
    else:
        probs = F.softmax(_confidence_logits(logits, params, spec).to(conf_dtype), dim=-1)
        conf = probs.gather(-1, tokens[:, None])[:, 0]          # noise-free prob of the chosen token
    return Candidates(tokens, conf.to(torch.float64), lambda: entropy(logits))


def entropy(logits: Tensor) -> Tensor:
    """logits (n, V) -> (n,) float64 predictive entropy in nats (-inf logits contribute 0)."""
    return torch.special.entr(F.softmax(logits.to(torch.float64), dim=-1)).sum(dim=-1)


def _confidence_logits(logits: Tensor, params: SamplingParams, spec) -> Tensor:
    """The logits ML-GSAI's softmax sees when `confidence_eos_eot_inf` is on.

    Its chained `lwn[..., EOS] = logits[..., EOT] = -inf` comes after the token was drawn, so it
    only changes confidences: EOT always, EOS too at temperature 0, where `lwn` *is* `logits`.
    """
    if not params.confidence_eos_eot_inf:
        return logits
    ids = [_special(spec, "eot_token_id", "confidence_eos_eot_inf")]
    if params.temperature == 0:
        ids.append(_special(spec, "eos_token_id", "confidence_eos_eot_inf"))
    return _with_neg_inf(logits, ids)


def _with_neg_inf(logits: Tensor, ids: list[int]) -> Tensor:
    out = logits.clone()
    out[..., ids] = float("-inf")
    return out


def _special(spec, field: str, flag: str) -> int:
    value = getattr(spec, field, None) if spec is not None else None
    if value is None:
        raise ValueError(f"{flag}=True needs the model's {field}, but "
                         f"{'no ModelSpec was given' if spec is None else f'spec.{field} is None'}: "
                         "pass spec= (from load_model) or turn the flag off")
    return int(value)
