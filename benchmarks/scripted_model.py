"""`ScriptedTPF`: a model wrapper that makes confidence-threshold policies commit k tokens a step.

A benchmark device, not a language model. Random weights (models/random_weights.py) predict
noise, so a threshold policy commits one token per forward (its guaranteed minimum) and
"four tokens per step" could only be a fixed quota. This wrapper runs the wrapped model's
forward unchanged (same shapes, same cost), then overwrites the logits of the first `k`
candidate rows of every request with a confident peak on one fixed ordinary token and sets
the other candidate rows to uniform: the engine decodes only the candidates, left-compacted in
position order (`logits_index`), so those are the first k masked positions of the request's
window. With a threshold below the peak's probability (~1) and the other rows at 1/V, the
policy commits exactly min(k, masks left) positions per forward, whatever the wrapped
weights: TPF is then *measured* through the real threshold path (sampler, commit, scheduler),
with k as the model's behaviour, not the schedule's quota. Tokens are meaningless.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from dfastllm_ray.models.spec import ModelSpec

PEAK_MARGIN = 30.0    # peak = the row's max + 30: p >= 1 / (1 + V e^-30) > 0.999 for V < 1e9


def ordinary_token(spec: ModelSpec) -> int:
    """The smallest id that is no special token (never EOS / EOT / mask / pad / bos), so the
    scripted commits never end a request early."""
    special = {spec.mask_token_id, spec.eos_token_id, spec.eot_token_id, spec.pad_token_id,
               spec.bos_token_id}
    return next(t for t in range(spec.vocab_size) if t not in special)


class ScriptedTPF(nn.Module):
    def __init__(self, inner: nn.Module, spec: ModelSpec, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"--scripted-tpf {k} is invalid: use an integer >= 1")
        self.inner, self.spec, self.k = inner, spec, k
        self.token = ordinary_token(spec)

    def forward(self, input_ids: Tensor, positions: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, kv=None,
                logits_index: Optional[Tensor] = None) -> Tensor:
        logits = self.inner(input_ids, positions=positions, attn_bias=attn_bias, kv=kv,
                            logits_index=logits_index)                       # (B, n, V)
        if logits_index is None:        # a whole-canvas call (not the engine's): leave it
            return logits
        k = min(self.k, logits.shape[1])
        head = logits[:, :k]                                                 # (B, k, V) view
        head[..., self.token] = head.amax(dim=-1) + PEAK_MARGIN
        logits[:, k:] = 0.0                  # the other candidates: uniform, confidence 1 / V
        return logits
