"""The plain reference loop of every batched LLaDA policy, stateful and revoking ones included.

`policy_generate(model, prompt, params, spec=)` decodes like ML-GSAI `generate` without a KV
cache (a full-canvas forward per step, semi-autoregressive blocks, the linear schedule's quota)
and calls the *same* batched functions the engine runs (`BATCH_POLICIES`, `klass.klass`,
`wino.wino`) on the active block, one forward per step. Rows are independent: a row's tokens
depend only on its own canvas, so B rows at once == each row alone (tested), and B = 1 is the
per-request reference.

- Candidate slots are the active block's positions in order (slot j = position s + j), valid
  where masked; WINO's slots are every block position (masked or committed-but-revocable).
- `fixed`, `pc_sampler`, `sched_exit` end a block after steps_per_block forwards (as ML-GSAI and
  the engine); the other policies loop until the block has no mask; past the schedule their
  fallback quota is 1.
- KLASS keeps `klass.KlassState` for the block (reset when a block opens); dInfer's credit
  fusion keeps `credit.CreditState` and runs the threshold rule on the fused logits.
- WINO runs each forward on the canvas plus a shadow of the block (`wino.shadow_bias`); revoked
  positions are re-masked; a block is final when it has no mask left.
- Early exit (`params.early_exit`): a row stops after a block that leaves EOS/EOT in its output.

Returns a `PolicyRun`: the canvas, per-row forwards (NFE) and decoded positions (TPF =
decoded / NFE), and, when `trace=True`, every step's commits and revocations and each block's
tokens at the moment it became final (what a server may stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import GroupFacts, RowKnobs
from .batch_policies import BATCH_POLICIES, Ranked
from .batch_propose import propose_batch
from .credit import CREDIT_THRESHOLD, CreditState, credit_fuse, credit_update
from .klass import KLASS_HISTORY, KLASS_KL, TOP_K, KlassState, klass
from .params import SamplingParams, dus_groups
from .schedule import transfer_counts
from .wino import WINO_REVOKE, shadow_bias, wino

SCHEDULED = ("fixed", "pc_sampler", "sched_exit", "dus")
KNOB_COLS = ("temperature", "threshold", "factor", "entropy_bound", "alg_temp", "top_p", "top_k",
             "random_remask", "logits_eos_inf", "conf_eos_eot_inf", "conf_alg", "pc_lambda",
             "exit_high", "exit_low", "block_length", "dus_groups")
META_COLS = ("k", "quota", "policy", "step", "conf_alg", "block_start")


@dataclass
class PolicyRun:
    x: Tensor                                    # (B, Lp + max_tokens) int64 canvas
    nfe: list[int]                               # forwards each row took part in
    decoded: list[int]                           # generation positions of the blocks decoded
    steps: list[dict] = field(default_factory=list)        # trace: per row and step
    finals: dict = field(default_factory=dict)             # trace: (row, block) -> tokens

    @property
    def tpf(self) -> float:
        return sum(self.decoded) / max(sum(self.nfe), 1)


def knob_values(p: SamplingParams) -> list[float]:
    """One row of KNOB_COLS (NaN where unset), the engine's `knob_row` for LLaDA requests."""
    nan = float("nan")
    opt = lambda v: nan if v is None else float(v)          # noqa: E731
    return [p.temperature, opt(p.threshold), opt(p.factor), opt(p.entropy_bound), 0.0, 1.0, 0.0,
            float(p.remasking == "random"), float(p.logits_eos_inf),
            float(p.confidence_eos_eot_inf), 0.0, opt(p.pc_lambda), opt(p.exit_high),
            p.exit_low_or_default if p.exit_high is not None else nan, float(p.block_length or 0),
            dus_groups(p)]


def row_knobs(p: SamplingParams, s: int, valid: Tensor, k: list[int], nfe: list[int],
           seed: int) -> RowKnobs:
    """RowKnobs of B rows of one request's settings over the block slots [s, s + n): per-row
    quota k and forward count nfe (the counter RNG's step), as the engine packs them."""
    b, n = valid.shape
    table = torch.tensor([knob_values(p)] * b, dtype=torch.float64)
    meta = torch.tensor([[k[r], k[r], 0, nfe[r], -1, s] for r in range(b)], dtype=torch.float64)
    positions = torch.arange(s, s + n).expand(b, n)
    return RowKnobs(table=table, col={c: i for i, c in enumerate(KNOB_COLS)}, meta=meta,
                    imeta=meta.long(), meta_col={c: i for i, c in enumerate(META_COLS)},
                    seeds=torch.full((b,), seed, dtype=torch.long), positions=positions,
                    valid=valid)


@torch.no_grad()
def policy_generate(model: Callable[..., Tensor], prompt: Tensor, params: SamplingParams, *,
                    spec, trace: bool = False, seed: int = 0,
                    conf_dtype: torch.dtype = torch.float32, klass_top_k: int = TOP_K
                    ) -> PolicyRun:
    """prompt (B, Lp) int64, no padding -> PolicyRun (see the module docstring)."""
    p = params.resolve()
    if p.policy == "credit" and p.threshold is None:        # dInfer's threshold rule default
        p = replace(p, threshold=CREDIT_THRESHOLD)
    if p.alg is not None or p.cfg_scale > 0:
        raise ValueError("policy_generate decodes LLaDA-family policies without CFG: use "
                         "llada_generate / dream_generate for those settings")
    b, lp = prompt.shape
    x = torch.full((b, lp + p.max_tokens), spec.mask_token_id, dtype=torch.long)
    x[:, :lp] = prompt
    run = PolicyRun(x, [0] * b, [0] * b)
    alive = torch.ones(b, dtype=torch.bool)
    facts = GroupFacts(family="llada", policies=(p.policy,), sampled=p.temperature > 0,
                       random_remask=p.remasking == "random", logits_eos_inf=p.logits_eos_inf,
                       conf_eos_eot_inf=p.confidence_eos_eot_inf, conf_dtype=conf_dtype)
    nb = p.max_tokens // p.block_length
    for blk in range(nb):
        s, e = lp + blk * p.block_length, lp + (blk + 1) * p.block_length
        _decode_block(model, run, p, spec, facts, alive, s, e, p.steps // nb, seed, trace,
                      klass_top_k)
        for r in torch.nonzero(alive).flatten().tolist():
            run.decoded[r] += e - s
            if trace:
                run.finals[(r, blk)] = x[r, s:e].tolist()
            if p.early_exit and any(t in spec.stop_token_ids for t in x[r, lp:e].tolist()):
                alive[r] = False
    return run


def _decode_block(model, run: PolicyRun, p: SamplingParams, spec, facts: GroupFacts,
                  alive: Tensor, s: int, e: int, spb: int, seed: int, trace: bool,
                  klass_top_k: int) -> None:
    x, mask_id, n = run.x, spec.mask_token_id, e - s
    quotas = [transfer_counts(int(m), spb) for m in (x[:, s:e] == mask_id).sum(1).tolist()]
    state = (KlassState.empty(x.shape[0], n, klass_top_k) if p.policy == "klass" else
             CreditState.empty(x.shape[0], n) if p.policy == "credit" else None)
    i = 0
    while True:
        masked = x[:, s:e] == mask_id                                       # (B, n)
        active = alive & masked.any(-1)
        if p.policy in SCHEDULED and i >= spb or not bool(active.any()):
            return
        k = [q[i] if i < spb else 1 for q in quotas]
        valid = (masked | (p.policy == "wino")) & active[:, None]
        knobs = row_knobs(p, s, valid, k, run.nfe, seed)
        logits, shadow = _forward(model, x, mask_id if p.policy == "wino" else None, s, e)
        if p.policy == "credit":
            state = credit_update(logits, valid, state)
            logits = credit_fuse(logits, state, p.credit_alpha)
        tokens, conf, entropy = propose_batch(logits, knobs, facts, spec.eos_token_id,
                                              spec.eot_token_id)
        ranked = Ranked(conf, entropy, knobs)
        revoke = torch.zeros_like(masked)
        if p.policy == "klass":
            probs = F.softmax(logits.to(facts.conf_dtype), dim=-1)
            commit, state = klass(conf, knobs, ranked, probs, state,
                                  torch.full((x.shape[0],), p.kl_threshold or KLASS_KL, dtype=torch.float64),
                                  torch.full((x.shape[0],), p.kl_history or KLASS_HISTORY))
        elif p.policy == "wino":
            back = F.softmax(shadow.to(conf.dtype), dim=-1).gather(-1, x[:, s:e, None])[..., 0]
            commit, revoke = wino(conf, knobs, ranked, masked, back,
                                  torch.full((x.shape[0],), p.revoke_threshold or WINO_REVOKE,
                                             dtype=torch.float64))
        else:
            name = "threshold" if p.policy == "credit" else p.policy
            commit = BATCH_POLICIES[name](conf, knobs, ranked)
        block = x[:, s:e]
        block.copy_(torch.where(commit & valid, tokens, block))
        block.masked_fill_(revoke & valid, mask_id)
        for r in torch.nonzero(active).flatten().tolist():
            run.nfe[r] += 1
            if trace:
                run.steps.append(_trace_step(r, i, s, commit[r] & valid[r], revoke[r] & valid[r],
                                             tokens[r]))
        i += 1


def _trace_step(r: int, i: int, s: int, commit: Tensor, revoke: Tensor, tokens: Tensor) -> dict:
    """One row's step: committed {position: token} and revoked positions (canvas positions)."""
    at = torch.nonzero(commit).flatten()
    return {"row": r, "step": i, "block_start": s,
            "commit": dict(zip((at + s).tolist(), tokens[at].tolist())),
            "revoke": (torch.nonzero(revoke).flatten() + s).tolist()}


def _forward(model, x: Tensor, shadow_mask: int | None, s: int, e: int
             ) -> tuple[Tensor, Tensor | None]:
    """-> (logits at the block (B, n, V), the shadow's logits (B, n, V) or None). With
    `shadow_mask` (WINO) a block of that mask id is appended with the block's RoPE positions."""
    if shadow_mask is None:
        return model(x)[:, s:e], None
    b, length = x.shape
    ids = torch.cat([x, torch.full((b, e - s), shadow_mask, dtype=x.dtype)], 1)
    positions = torch.cat([torch.arange(length), torch.arange(s, e)]).expand(b, -1)
    out = model(ids, positions=positions, attn_bias=shadow_bias(length, s, e))
    return out[:, s:e], out[:, length:]
