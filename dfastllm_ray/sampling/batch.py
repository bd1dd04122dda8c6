"""`RowKnobs` / `GroupFacts`: what the batched sampler reads, per row on the device, per group on the host.

The batched sampler (batch_propose.py, batch_policies.py) decides for every request of a forward
group at once. Each request's knobs are one row of small device tensors (gathered from the
engine's slot table), so a policy is a few tensor ops over (B, n) whatever B is. What the host
knows about the whole group without looking at the device (`GroupFacts`: which policies are
present, whether any row samples, which confidences are read) only chooses which ops run: it
never branches per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Dream's confidence kinds (`sample_tokens`): token probability, top1 - top2, negative entropy
CONF_PROB, CONF_MARGIN, CONF_NEG_ENTROPY = 0, 1, 2


class RowKnobs:
    """Per-row decoding inputs of one group, all on the device. B rows, n candidate slots.

    Built from the engine's slot table rows (B, K) and the step's packed metadata; each knob is
    a column sliced on first use and kept, so a step dispatches ops only for what its policies
    read. Shapes: every knob (B,) unless said; positions / valid / rng_keys (B, n)."""

    def __init__(self, table: Tensor, col: dict, meta: Tensor, imeta: Tensor, meta_col: dict,
                 seeds: Tensor, positions: Tensor, valid: Tensor, columns: Tensor | None = None,
                 all_valid: bool = False, converted: dict | None = None):
        self._table, self._col, self._meta, self._imeta, self._mcol = table, col, meta, imeta, meta_col
        self._seeds = seeds
        self.positions = positions        # (B, n) int64 canvas positions of the candidates
        self.valid = valid                # (B, n) bool: a real candidate
        self.columns = columns            # (>= n,) int64 0, 1, ...: slot indices, if kept
        self.all_valid = all_valid        # host fact: no padding slot (valid is all True)
        self._converted = {} if converted is None else converted   # dtype -> the table in it
        self._cache: dict[str, Tensor] = {}

    def _get(self, name: str, make) -> Tensor:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def column(self, name: str, dtype: torch.dtype) -> Tensor:
        """(B, 1) knob `name` in `dtype`: a view of the table, or of its copy in that dtype
        (kept with the engine's window: a float32 confidence compares with no cast per step)."""
        table = self._table
        if dtype != table.dtype:
            table = self._converted.get(dtype)
            if table is None:
                table = self._converted[dtype] = self._table.to(dtype)
        return table.narrow(1, self._col[name], 1)

    def _knob(self, name: str) -> Tensor:
        return self._get(name, lambda: self._table.select(1, self._col[name]))

    # knobs of the request (slot table): NaN where unset
    temperature = property(lambda self: self._knob("temperature"))
    threshold = property(lambda self: self._knob("threshold"))
    factor = property(lambda self: self._knob("factor"))
    entropy_bound = property(lambda self: self._knob("entropy_bound"))
    alg_temp = property(lambda self: self._knob("alg_temp"))
    top_p = property(lambda self: self._knob("top_p"))                       # 1 = off
    revoke_threshold = property(lambda self: self._knob("revoke_threshold"))  # WINO narrow-out
    kl_threshold = property(lambda self: self._knob("kl_threshold"))          # KLASS
    kl_history = property(lambda self: self._knob("kl_history"))              # KLASS (NaN: default)
    top_k = property(lambda self: self._get("top_k_i", lambda: self._knob("top_k").long()))  # 0 = off
    random_remask = property(lambda self: self._get("rr", lambda: self._knob("random_remask") > 0))
    logits_eos_inf = property(lambda self: self._get("lei", lambda: self._knob("logits_eos_inf") > 0))
    conf_eos_eot_inf = property(lambda self: self._get("ceei", lambda: self._knob("conf_eos_eot_inf") > 0))
    pc_lambda = property(lambda self: self._knob("pc_lambda"))               # PC-Sampler decay
    exit_high = property(lambda self: self._knob("exit_high"))               # SchED tau at progress 0
    exit_low = property(lambda self: self._knob("exit_low"))                 # SchED tau at progress 1
    block_length = property(lambda self: self._knob("block_length"))
    dus_groups = property(lambda self: self._knob("dus_groups"))             # DUS: steps per block

    # per-step values (packed metadata)
    k = property(lambda self: self._imeta[:, self._mcol["k"]])              # commit count (0: none)
    policy = property(lambda self: self._imeta[:, self._mcol["policy"]])    # index into facts.policies
    block_start = property(lambda self: self._imeta[:, self._mcol["block_start"]])  # canvas position
    q_start = property(lambda self: self._imeta[:, self._mcol["q_start"]])          # window start
    cand_start = property(lambda self: self._imeta[:, self._mcol["cand_start"]])    # candidate range

    @property
    def prob(self) -> Tensor:
        """(B,) float64 Dream origin's probability: the quota column (the engine's int64 meta
        carries its float64 bits: a dtype view, no op)."""
        q = self._meta[:, self._mcol["quota"]]
        return q if q.is_floating_point() else q.view(torch.float64)

    @property
    def conf_alg(self) -> Tensor:
        """(B,) int64 CONF_*: the step's Dream confidence, else the request's."""
        def make():
            step_alg = self._imeta[:, self._mcol["conf_alg"]]
            return torch.where(step_alg >= 0, step_alg, self._knob("conf_alg").long())
        return self._get("conf_alg", make)

    @property
    def temp_div(self) -> Tensor:
        """(B, 1, 1): temperature where > 0, else 1 (the logits divisor)."""
        t = self.temperature
        return self._get("temp_div", lambda: torch.where(t > 0, t, 1.0).view(-1, 1, 1))

    @property
    def hot(self) -> Tensor:
        """(B, 1) bool: the row samples its tokens (temperature > 0)."""
        return self._get("hot", lambda: (self.temperature > 0)[:, None])

    @property
    def rng_keys(self) -> Tensor:
        """(B, n) int64 counter-RNG keys: (request seed, its step, candidate position)."""
        def make():
            from . import rng
            step = self._imeta[:, self._mcol["step"]]
            return rng.position_keys(rng.row_key(self._seeds, step), self.positions)
        return self._get("rng_keys", make)


@dataclass(frozen=True)
class GroupFacts:
    """Host-side facts of one group (no device read): which op chains the group needs
    (frozen: the engine shares one record between the groups of equal facts)."""
    family: str                                  # "llada" | "dream": the proposal rule
    policies: tuple[str, ...]                    # distinct policy names present, in id order
    sampled: bool = False                        # some row has temperature > 0
    random_remask: bool = False
    logits_eos_inf: bool = False
    conf_eos_eot_inf: bool = False
    top_p: bool = False
    top_k: bool = False
    conf_algs: frozenset = field(default_factory=frozenset)   # CONF_* present (Dream)
    conf_dtype: torch.dtype = torch.float32      # softmax / confidence precision
    padded: bool = True                          # some row has fewer candidates than slots

    @property
    def needs_entropy(self) -> bool:
        return "entropy_bound" in self.policies
