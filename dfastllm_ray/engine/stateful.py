"""Policies with per-position state across steps (KLASS), kept on the device by slot.

KLASS (sampling/klass.py) commits a position once its predictive distribution has been stable
for `kl_history` steps. Its state per block position is the previous step's top-K
probabilities and ids and a streak counter (`KlassState`, about 100 bytes per position, never
positions x vocabulary). The engine keeps it in (slots, L + 1, K) tensors, indexed by slot and
by the candidate's offset in its active block (column L is a dump for padded candidates);
a row's state is reset on the first step of each block, as the reference loop's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.spec import ModelSpec
from ..sampling.batch_policies import Ranked
from ..sampling.batch_propose import propose_batch
from ..sampling.klass import KLASS_HISTORY, KLASS_KL, TOP_K, KlassState, klass
from .input_batch import InputBatch
from .step_inputs import M, GroupInputs, GroupPlan

STATEFUL = ("klass",)


class KlassSlots:
    """The device-resident KLASS state of every slot (allocated on first use)."""

    def __init__(self, batch: InputBatch):
        s, length, dev = batch.num_slots, batch.max_len, batch.device
        self.dump = length
        self.top_ids = torch.zeros(s, length + 1, TOP_K, dtype=torch.long, device=dev)
        self.top_p = torch.zeros(s, length + 1, TOP_K, dtype=torch.float32, device=dev)
        self.streak = torch.zeros(s, length + 1, dtype=torch.long, device=dev)

    def gather(self, slot: Tensor, offset: Tensor, fresh: Tensor) -> KlassState:
        """(B,) slots, (B, n) block offsets, (B,) first step of a block -> the rows' state."""
        rows = slot[:, None]
        keep = ~fresh[:, None]
        return KlassState(self.top_ids[rows, offset] * keep[..., None],
                          self.top_p[rows, offset] * keep[..., None],
                          self.streak[rows, offset] * keep)

    def scatter(self, slot: Tensor, offset: Tensor, state: KlassState) -> None:
        rows = slot[:, None].expand_as(offset)
        self.top_ids[rows, offset] = state.top_ids
        self.top_p[rows, offset] = state.top_p
        self.streak[rows, offset] = state.streak


def decide_klass(logits: Tensor, g: GroupPlan, inputs: GroupInputs, slots: KlassSlots,
                 meta: Tensor, spec: ModelSpec) -> tuple[Tensor, Tensor]:
    """logits (B, n, V) -> (commit (B, n) bool, tokens (B, n)), the slots' state advanced."""
    knobs = inputs.knobs
    tokens, conf, entropy = propose_batch(logits, knobs, g.facts, spec.eos_token_id,
                                          spec.eot_token_id)
    probs = F.softmax(logits.to(g.facts.conf_dtype), dim=-1)
    im = meta.long()
    cand = inputs.cand_flat - (inputs.slot * (slots.dump + 1))[:, None]     # canvas positions
    offset = torch.where(knobs.valid, cand - im[:, M["block_start"]][:, None], slots.dump)
    offset = offset.clamp(0, slots.dump)
    state = slots.gather(inputs.slot, offset, im[:, M["block_step"]] == 0)
    kl = knobs.kl_threshold
    hist = knobs.kl_history
    commit, new = klass(conf, knobs, Ranked(conf, entropy, knobs), probs, state,
                        torch.where(torch.isnan(kl), KLASS_KL, kl),
                        torch.where(torch.isnan(hist), float(KLASS_HISTORY), hist).long())
    slots.scatter(inputs.slot, offset, new)
    return commit, tokens
