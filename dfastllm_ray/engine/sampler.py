"""The step's decisions for a whole forward group, on the device, in one op chain.

`sample` runs the batched proposal (sampling/batch_propose.py) and every policy present in the
group (sampling/batch_policies.py), merging them by each row's policy index; `commit` scatters
the committed tokens into the resident canvas and gathers what the host needs back (counts and
the generation positions), packed for the step's single device -> host copy. A request's tokens
depend only on its own logits, knobs and counter-RNG key, never on what it is batched with.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.spec import ModelSpec
from ..sampling.batch_policies import BATCH_POLICIES, Ranked
from ..sampling.batch_propose import propose_batch
from .input_batch import InputBatch
from .step_inputs import GroupInputs, GroupPlan


# Quota policies whose ties `exact_ties` breaks as the official torch.topk does
TOPK_POLICIES = ("fixed", "dream_topk", "dream_threshold", "sdar_static", "sdar_dynamic")


def sample(logits: Tensor, g: GroupPlan, inputs: GroupInputs, spec: ModelSpec,
           exact_ties: bool = False) -> tuple[Tensor, Tensor]:
    """logits (B, n, V) at the candidates -> (commit (B, n) bool, tokens (B, n) int64)."""
    knobs = inputs.knobs
    tokens, conf, entropy = propose_batch(logits, knobs, g.facts, spec.eos_token_id,
                                          spec.eot_token_id, inputs.dense)
    ranked = Ranked(conf, entropy, knobs)
    if exact_ties and any(p in TOPK_POLICIES for p in g.facts.policies):
        ranked.top = official_topk(conf, inputs, g)
    commit = None
    for i, name in enumerate(g.facts.policies):
        chosen = BATCH_POLICIES[name](conf, knobs, ranked)
        if commit is None:
            commit = chosen
        else:                       # mixed group: each row keeps its own policy's decision
            commit = torch.where((knobs.policy == i)[:, None], chosen, commit)
    return commit, tokens


def official_topk(conf: Tensor, inputs: GroupInputs, g: GroupPlan) -> Tensor:
    """(B, n) bool: each row's k most confident as `torch.topk` picks them over the official
    code's row layout (the forward window, -inf off the candidates). torch.topk's choice among
    equal values depends on that layout (the row's own window width, not the group's padded
    one), so only this reproduces the official ties. One topk per distinct (k, width), both
    host-known, never a host sync."""
    b = conf.shape[0]
    window = torch.full((b, g.lq + 1), float("-inf"), dtype=conf.dtype, device=conf.device)
    offset = inputs.cand_offset
    block = g.facts.family == "sdar"     # SDAR's row is the block, not the (fused) window
    if block:
        offset = offset - (inputs.knobs.cand_start - inputs.knobs.q_start)[:, None]
    rows = torch.where(inputs.knobs.valid, offset, g.lq)                 # row columns
    window.scatter_(1, rows, conf)
    top = torch.zeros(b, g.lq + 1, dtype=torch.bool, device=conf.device)
    by_k: dict[tuple[int, int], list[int]] = {}
    for r, item in enumerate(g.items):
        if item.k > 0:               # topk's ties also depend on the row's length: its own
            width = item.cand_end - item.cand_start if block else item.q_len
            by_k.setdefault((item.k, width), []).append(r)
    for (k, width), members in by_k.items():
        idx = torch.tensor(members, device=conf.device)
        picked = torch.topk(window[idx, :width], k, dim=-1).indices
        top[idx] = top[idx].scatter(1, picked, True)
    return top.gather(1, rows) & inputs.knobs.valid


def commit(batch: InputBatch, inputs: GroupInputs, commit_mask: Tensor, tokens: Tensor) -> Tensor:
    """Write the decisions into the canvas -> packed (B, 2 + W) int64: committed count, committed
    inside the active block, then the generation positions after the step."""
    canvas = batch.canvas                   # take / index_copy_ index it as its flat view
    new = torch.where(commit_mask, tokens, batch.mask_id)      # uncommitted candidates stay masked
    # padding: the dump column (its mask id again). index_copy_, not put_: put_ has no
    # deterministic kernel and raises under torch.use_deterministic_algorithms(True)
    batch.flat_canvas.index_copy_(0, inputs.cand_flat.reshape(-1), new.reshape(-1))
    if inputs.in_block is None:                # every candidate is in the block: one count
        counts = commit_mask.sum(1, keepdim=True).expand(-1, 2)                        # (B, 2)
    else:
        counts = torch.stack((commit_mask, commit_mask & inputs.in_block), dim=1).sum(2)
    return torch.cat((counts, canvas.take(inputs.gen_flat)), dim=1)


def snapshot(batch: InputBatch, inputs: GroupInputs) -> Tensor:
    """The packed result of a forward that commits nothing: zero counts and the generation."""
    gen = batch.canvas.take(inputs.gen_flat)
    return torch.cat((torch.zeros(gen.shape[0], 2, dtype=gen.dtype, device=gen.device), gen), dim=1)
