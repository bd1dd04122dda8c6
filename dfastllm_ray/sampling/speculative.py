"""Lossless speculative drafting: a diffusion LM drafts, the causal LM verifies (reference loop).

    out = speculative_generate(drafter, drafter_spec, verifier, verifier_spec, prompt, params)

The training-free form of the "diffusion drafts, AR verifies" family (SpecDiff, DEER). Each step:

1. one drafter forward over the committed tokens + k mask tokens; the k masked rows (shifted
   when the drafter's spec says so) give independent proposals q_j, drafts d_j ~ q_j, left to
   right (`draft_probs`);
2. one verifier forward over the not-yet-cached committed tokens + the draft: p_0 .. p_k, p_j the
   AR distribution of draft position j given the committed tokens and d_<j, p_k the bonus;
3. standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023; `speculative_accept`):
   accept d_j while u_j < p_j(d_j) / q_j(d_j), resample the first rejected position from the
   normalised residual max(0, p_j - q_j), or draw the bonus token from p_k when all k are
   accepted. Every step commits accepted + 1 tokens, distributed exactly as the AR model's.

At temperature 0 p and q are one-hot argmaxes, so the rule reduces to "accept while the draft is
the AR argmax, then the AR argmax": the output is the AR model's greedy output (ar_generate.py).
The verifier's exact cache (models/causal_kv.py) always holds the committed tokens but the last.

Adaptive draft length (`adaptive=True`): the heuristic of transformers' assisted generation --
k grows by 2 after a step that accepted every draft token, else shrinks by 1 (floor 1), capped
at `draft_tokens` (`next_draft_length`). Any k is lossless; only the speed changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ..models.causal_kv import CausalKV
from ..models.spec import ModelSpec
from .ar_generate import sample_from, target_probs

# (draft (B,k), q (B,k,V), p (B,k+1,V), u_accept (B,k), u_next (B,), lengths (B,) | None)
#   -> (accepted (B,), next_token (B,))
AcceptRule = Callable[..., "tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class SpeculativeParams:
    max_new_tokens: int                 # tokens to generate (fewer when a stop token comes)
    draft_tokens: int = 4               # k: drafted positions per step (the cap when adaptive)
    temperature: float = 0.0            # of both the draft and the target distributions
    adaptive: bool = False              # adapt k from the last step's acceptance

    def __post_init__(self):
        for name, lo in (("max_new_tokens", 1), ("draft_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: it must be an int >= {lo}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: it must be >= 0")


@dataclass
class SpeculativeOutput:
    tokens: list[int]                   # generated ids (a stop token included when hit)
    accepted: list[int] = field(default_factory=list)       # accepted draft tokens per step
    draft_lengths: list[int] = field(default_factory=list)  # k used per step
    drafter_forwards: int = 0
    verifier_forwards: int = 0


def speculative_accept(draft: Tensor, q: Tensor, p: Tensor, u_accept: Tensor, u_next: Tensor,
                       lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The accept / resample step, batched over rows with ragged draft lengths.

    draft (B, k) int64; q (B, k, V) the draft distributions (q[b, j, draft[b, j]] > 0); p (B, k+1,
    V) the target distributions; u_accept (B, k), u_next (B,) uniforms in [0, 1); lengths (B,)
    valid drafts per row (default k; p[b, lengths[b]] is then that row's bonus row).
    -> accepted (B,) in [0, lengths], next_token (B,): the resampled token at the first
    rejection, or the bonus token. Committed per row: draft[:accepted] then next_token."""
    b, k = draft.shape
    lengths = torch.full((b,), k, device=draft.device) if lengths is None else lengths
    pd = p[:, :k].gather(-1, draft[..., None])[..., 0]                 # (B, k) p_j(d_j)
    qd = q.gather(-1, draft[..., None])[..., 0]                        # (B, k) q_j(d_j)
    ok = (u_accept * qd < pd) & (torch.arange(k, device=draft.device)[None] < lengths[:, None])
    accepted = ok.long().cumprod(-1).sum(-1)                           # (B,)
    rows = torch.arange(b, device=draft.device)
    p_n = p[rows, accepted]                                            # (B, V)
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)          # row k: no draft
    residual = (p_n - q_pad[rows, accepted]).clamp_min(0)
    rejected = (accepted < lengths)[:, None]
    dist = torch.where(rejected & (residual.sum(-1, keepdim=True) > 0), residual, p_n)
    return accepted, sample_from(dist, u_next)


def next_draft_length(k: int, accepted: int, cap: int) -> int:
    """transformers' assisted-generation heuristic: +2 when all k were accepted, else -1."""
    return min(k + 2, cap) if accepted == k else max(k - 1, 1)


def draft_probs(drafter, spec: ModelSpec, committed: Tensor, k: int, vocab: int,
                temperature: float) -> Tensor:
    """One drafter forward over committed (1, L) + k masks -> q (1, k, vocab) float64.

    The drafter's logits are cut to the verifier's vocabulary and its mask id gets no mass (a
    draft of [MASK] could be accepted, then poison the next step's canvas)."""
    masks = torch.full((1, k), spec.mask_token_id, dtype=committed.dtype, device=committed.device)
    logits = drafter(torch.cat([committed, masks], dim=1))
    rows = logits[:, -k - 1:-1] if spec.logits_shift else logits[:, -k:]
    rows = rows[..., :vocab].clone()
    if spec.mask_token_id < vocab:
        rows[..., spec.mask_token_id] = float("-inf")
    return target_probs(rows, temperature)


def uniforms(shape: tuple[int, ...], temperature: float, generator, device) -> Tensor:
    """float64 U[0, 1) draws; none are needed (zeros) at temperature 0, where all is argmax."""
    if temperature == 0:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(device)


@torch.no_grad()
def speculative_generate(drafter, drafter_spec: ModelSpec, verifier, verifier_spec: ModelSpec,
                         prompt: Tensor, params: SpeculativeParams,
                         generator: Optional[torch.Generator] = None,
                         accept: AcceptRule = speculative_accept) -> SpeculativeOutput:
    """prompt (1, Lp) int64 -> SpeculativeOutput. Draws come from `generator` (global RNG if
    None): per step u (1, k) for the drafts, u (1, k) for acceptance, u (1,) for the last token."""
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)} is invalid: pass one non-empty "
                         "prompt of shape (1, Lp)")
    t, dev, vocab = params.temperature, prompt.device, verifier_spec.vocab_size
    committed, kv, k = prompt.clone(), CausalKV(), params.draft_tokens
    out = SpeculativeOutput([])
    while len(out.tokens) < params.max_new_tokens:
        k = min(k, params.max_new_tokens - len(out.tokens))
        q = draft_probs(drafter, drafter_spec, committed, k, vocab, t)      # (1, k, V)
        draft = sample_from(q, uniforms((1, k), t, generator, dev))         # (1, k)
        fresh = torch.cat([committed[:, kv.length:], draft], dim=1)
        p = target_probs(verifier(fresh, kv=kv)[:, -k - 1:], t)             # (1, k+1, V)
        n, nxt = accept(draft, q, p, uniforms((1, k), t, generator, dev),
                        uniforms((1,), t, generator, dev))
        n = int(n[0])
        new = torch.cat([draft[:, :n], nxt[:, None]], dim=1)
        kv.truncate(committed.shape[1] + n)                                 # all but the last
        committed = torch.cat([committed, new], dim=1)
        out.drafter_forwards += 1
        out.verifier_forwards += 1
        out.accepted.append(n)
        out.draft_lengths.append(k)
        if commit_tokens(out, new[0].tolist(), params.max_new_tokens, verifier_spec.stop_token_ids):
            break
        k = next_draft_length(k, n, params.draft_tokens) if params.adaptive else params.draft_tokens
    return out


def commit_tokens(out: SpeculativeOutput, new: list[int], limit: int, stops) -> bool:
    """Append up to the limit and the first stop token; True when generation is over."""
    for tok in new:
        out.tokens.append(tok)
        if tok in stops or len(out.tokens) >= limit:
            return True
    return False
