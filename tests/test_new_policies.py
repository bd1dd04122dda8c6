"""The newer policies as pure functions: batched == row by row, == a plain per-row statement of
the rule, and KLASS's bounded state (coarse KL) against the official full-vocabulary KL."""
from __future__ import annotations

import math
import random

import pytest
import torch

from dfastllm_ray.sampling.batch import RowKnobs
from dfastllm_ray.sampling.batch_policies import BATCH_POLICIES, Ranked
from dfastllm_ray.sampling.klass import KlassState, advance, coarse_kl, klass, reference_kl
from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.sampling.policy_generate import KNOB_COLS, META_COLS, knob_values
from dfastllm_ray.sampling.wino import shadow_bias, wino

N = 12          # slots per row (a block of 12)


def batch_knobs(params: list[SamplingParams], starts: list[int], valid: torch.Tensor,
                k: list[int]) -> RowKnobs:
    """RowKnobs whose row r has params[r], block start starts[r], quota k[r]."""
    table = torch.tensor([knob_values(p) for p in params], dtype=torch.float64)
    meta = torch.tensor([[k[r], k[r], 0, 0, -1, starts[r]] for r in range(len(params))],
                        dtype=torch.float64)
    positions = torch.tensor(starts)[:, None] + torch.arange(valid.shape[1])
    return RowKnobs(table, {c: i for i, c in enumerate(KNOB_COLS)}, meta, meta.long(),
                    {c: i for i, c in enumerate(META_COLS)}, torch.zeros(len(params), dtype=torch.long),
                    positions, valid)


def random_rows(rng: random.Random, b: int):
    """Confidences with ties (values on a 0.05 grid), random candidate sets (at least one)."""
    conf = torch.tensor([[rng.randrange(21) / 20 for _ in range(N)] for _ in range(b)],
                        dtype=torch.float32)
    valid = torch.rand(b, N, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < 0.7
    valid[:, rng.randrange(N)] = True
    return conf.masked_fill(~valid, float("-inf")), valid


def row(t: torch.Tensor, r: int) -> torch.Tensor:
    return t[r:r + 1]


POLICY_PARAMS = {
    "pc_sampler": lambda rng: {"pc_lambda": rng.choice([0.0, 0.25, 1.0])},
    "sched_exit": lambda rng: {"exit_high": rng.choice([0.9, 0.6]),
                               "exit_low": rng.choice([0.3, 0.5])},
    "dus": lambda rng: {"dilated": True, "max_tokens": N, "steps": rng.choice([1, 2, 3, 4, 6])},
}


def dus_visit(s: int) -> list[int]:
    """DUS's group order for s groups: residues by their reversed binary digits (s = 4:
    0, 2, 1, 3), written out digit by digit."""
    bits = max((s - 1).bit_length(), 0)
    return sorted(range(s), key=lambda r: int(format(r, f"0{bits}b")[::-1] or "0", 2))


def plain_rule(name: str, conf: list[float], valid: list[bool], p: SamplingParams, k: int,
               start: int, block_length: int) -> list[bool]:
    """The rule for one row as written in the papers (slots in position order, ties to the lower
    position)."""
    idx = [j for j in range(N) if valid[j]]
    if name == "pc_sampler":
        score = {j: conf[j] * math.exp(-p.pc_lambda * j) for j in idx}
    elif name == "dus":                           # group first (visit order), confidence within
        visit = dus_visit(p.steps)
        score = {j: conf[j] - 2 * visit.index(j % p.steps) for j in idx}
    else:
        score = {j: conf[j] for j in idx}
        mean = sum(conf[j] for j in idx) / len(idx)
        progress = 1 - len(idx) / block_length
        tau = p.exit_high - (p.exit_high - p.exit_low_or_default) * progress
        if mean >= tau:
            return list(valid)
    top = sorted(idx, key=lambda j: (-score[j], j))[:k]
    return [j in top for j in range(N)]


@pytest.mark.parametrize("name", list(POLICY_PARAMS))
def test_stateless_policy_batch_equals_rows_and_rule(name):
    rng = random.Random(name)
    for trial in range(20):
        b = 6
        conf, valid = random_rows(rng, b)
        params = [SamplingParams(block_length=N, **POLICY_PARAMS[name](rng)) for _ in range(b)]
        k = [rng.randrange(0, 4) for _ in range(b)]
        starts = [0] * b                                       # slot j = block offset j
        knobs = batch_knobs(params, starts, valid, k)
        got = BATCH_POLICIES[name](conf, knobs, Ranked(conf, lambda: None, knobs))
        for r in range(b):
            kr = batch_knobs(params[r:r + 1], starts[r:r + 1], row(valid, r), k[r:r + 1])
            alone = BATCH_POLICIES[name](row(conf, r), kr, Ranked(row(conf, r), lambda: None, kr))
            assert torch.equal(alone[0], got[r]), (trial, r)
            want = plain_rule(name, conf[r].tolist(), valid[r].tolist(), params[r], k[r],
                              starts[r], N)
            assert got[r].tolist() == want, (trial, r, conf[r], valid[r], k[r])


def test_dus_commits_one_dilated_group_per_step_and_no_neighbours():
    """16 offsets, 4 steps of 4: the groups are offsets = 0, 2, 1, 3 (mod 4) in that order,
    whatever the confidences say; within a step no two committed offsets are adjacent."""
    p = SamplingParams(dilated=True, max_tokens=16, block_length=16, steps=4)
    conf = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    open_ = torch.ones(1, 16, dtype=torch.bool)
    groups = []
    for _ in range(4):
        knobs = batch_knobs([p], [5], open_, [4])
        c = conf.masked_fill(~open_, float("-inf"))
        out = BATCH_POLICIES["dus"](c, knobs, Ranked(c, lambda: None, knobs))
        groups.append(out[0].nonzero().flatten().tolist())
        open_ &= ~out
    assert groups == [[0, 4, 8, 12], [2, 6, 10, 14], [1, 5, 9, 13], [3, 7, 11, 15]]
    assert dus_visit(8) == [0, 4, 2, 6, 1, 5, 3, 7]


def test_pc_sampler_weights_block_offsets_not_canvas_positions():
    """Only the offset from the block start decays the score: a block at canvas 100 ranks like
    one at 0."""
    conf = torch.tensor([[0.5, 0.6, 0.9, 0.1]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    p = SamplingParams(pc_lambda=1.0, block_length=4)
    for start in (0, 100):
        knobs = batch_knobs([p], [start], valid, [1])
        out = BATCH_POLICIES["pc_sampler"](conf, knobs, Ranked(conf, lambda: None, knobs))
        assert out.tolist() == [[True, False, False, False]]      # 0.5 > 0.6/e > 0.9/e^2


def wino_plain(conf, masked, back, valid, thr, revoke_thr):
    """Official `decoding_wino` for one row (B = 1), with this project's revoke cap."""
    cand = [j for j in range(N) if valid[j] and masked[j]]
    cap = min(max(int(len(cand) * 0.7), 5), 20)
    above = [j for j in cand if conf[j] > thr]
    order = sorted(cand, key=lambda j: (-conf[j], j))
    commit = set(order[:cap]) if len(above) > cap else set(above) or {order[0]}
    held = [j for j in range(N) if valid[j] and not masked[j]]
    weak = [j for j in held if back[j] < revoke_thr]
    revoke = set(sorted(weak, key=lambda j: (back[j], j))[:max(len(commit) - 1, 0)])
    return [j in commit for j in range(N)], [j in revoke for j in range(N)]


def test_wino_batch_equals_rows_and_official_rule():
    rng = random.Random(7)
    for trial in range(30):
        b = 5
        conf, _ = random_rows(rng, b)
        valid = torch.ones(b, N, dtype=torch.bool)
        valid[:, rng.randrange(1, N):] = rng.random() < 0.3      # some rows shorter
        masked = torch.rand(b, N, generator=torch.Generator().manual_seed(trial)) < 0.6
        masked[:, 0] = True
        conf = torch.tensor([[rng.randrange(21) / 20 for _ in range(N)] for _ in range(b)])
        back = torch.tensor([[rng.randrange(21) / 20 for _ in range(N)] for _ in range(b)])
        params = [SamplingParams(threshold=rng.choice([0.3, 0.6]),
                                 revoke_threshold=rng.choice([0.7, 0.9])) for _ in range(b)]
        knobs = batch_knobs(params, [0] * b, valid, [1] * b)
        rt = torch.tensor([p.revoke_threshold for p in params], dtype=torch.float64)
        commit, revoke = wino(conf, knobs, None, masked, back, rt)
        assert not (commit & ~masked).any() and not (revoke & masked).any()
        for r in range(b):
            kr = batch_knobs(params[r:r + 1], [0], row(valid, r), [1])
            c1, r1 = wino(row(conf, r), kr, None, row(masked, r), row(back, r), rt[r:r + 1])
            assert torch.equal(c1[0], commit[r]) and torch.equal(r1[0], revoke[r])
            want_c, want_r = wino_plain(conf[r].tolist(), masked[r].tolist(), back[r].tolist(),
                                        valid[r].tolist(), params[r].threshold,
                                        params[r].revoke_threshold)
            assert commit[r].tolist() == want_c and revoke[r].tolist() == want_r, (trial, r)
            assert int(commit[r].sum()) - int(revoke[r].sum()) >= 1      # net progress


def test_shadow_bias_hides_only_the_own_position():
    bias = shadow_bias(6, 2, 4)[0, 0] == 0                 # True = attend; canvas 6, block [2, 4)
    assert bias.shape == (8, 8)
    assert bias[:6, :6].all() and not bias[:6, 6:].any()          # canvas never sees the shadow
    assert bias[6, :6].tolist() == [True, True, False, True, True, True]
    assert bias[7, :6].tolist() == [True, True, True, False, True, True]
    assert bias[6:, 6:].all()


def test_coarse_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    v = 30
    prev = torch.softmax(torch.randn(2, 5, v, generator=g) * 3, -1)
    cur = torch.softmax(torch.randn(2, 5, v, generator=g) * 3, -1)
    exact = reference_kl(cur, prev)
    for k, check in ((v, "exact"), (4, "lower")):
        top_p, top_ids = prev.topk(k, dim=-1)
        state = KlassState(top_ids, top_p.to(torch.float32), torch.zeros(2, 5, dtype=torch.long))
        kl = coarse_kl(cur, state)
        if check == "exact":
            torch.testing.assert_close(kl, exact, rtol=1e-5, atol=1e-6)
        else:
            assert (kl <= exact + 1e-6).all()
    assert torch.isinf(coarse_kl(cur, KlassState.empty(2, 5, 4))).all()   # no history yet


def test_klass_needs_history_steps_of_small_kl_then_commits_confident_ones():
    v, b = 10, 2
    logits = torch.full((b, N, v), -5.0)
    logits[..., 3] = 5.0                                    # the same confident guess every step
    probs = torch.softmax(logits, -1)
    conf = probs[..., 3].clone()
    valid = torch.ones(b, N, dtype=torch.bool)
    params = [SamplingParams(kl_threshold=0.015)] * b
    knobs = batch_knobs(params, [0] * b, valid, [1] * b)
    ranked = Ranked(conf, lambda: None, knobs)
    state = KlassState.empty(b, N, 4)
    thr, hist = torch.full((b,), 0.015), torch.full((b,), 2)
    for step in range(3):
        commit, state = klass(conf, knobs, ranked, probs, state, thr, hist)
        want = N if step >= 2 else 1                       # before: the fixed fallback (k = 1)
        assert commit.sum(-1).tolist() == [want] * b, step
    assert state.top_ids.shape == (b, N, 4) and state.streak.shape == (b, N)


def test_klass_batch_equals_rows():
    g = torch.Generator().manual_seed(3)
    b, v = 4, 16
    params = [SamplingParams(threshold=0.2, kl_threshold=0.3)] * b
    valid = torch.rand(b, N, generator=g) < 0.8
    valid[:, 0] = True
    state = KlassState.empty(b, N, 5)
    base = torch.randn(b, N, v, generator=g) * 2
    thr, hist = torch.full((b,), 0.3), torch.full((b,), 1)
    for step in range(4):
        probs = torch.softmax(base + 0.3 * torch.randn(b, N, v, generator=g), -1)
        conf = probs.max(-1).values.masked_fill(~valid, float("-inf"))
        knobs = batch_knobs(params, [0] * b, valid, [2] * b)
        commit, new = klass(conf, knobs, Ranked(conf, lambda: None, knobs), probs, state, thr, hist)
        for r in range(b):
            kr = batch_knobs(params[:1], [0], row(valid, r), [2])
            sr = KlassState(row(state.top_ids, r), row(state.top_p, r), row(state.streak, r))
            c1, n1 = klass(row(conf, r), kr, Ranked(row(conf, r), lambda: None, kr),
                           row(probs, r), sr, thr[:1], hist[:1])
            assert torch.equal(c1[0], commit[r]) and torch.equal(n1.streak[0], new.streak[r])
        state = new


def test_advance_keeps_top_k_not_the_vocabulary():
    probs = torch.softmax(torch.randn(3, N, 1000), -1)
    s = advance(probs, KlassState.empty(3, N, 8), torch.full((3,), 0.01))
    assert s.top_p.shape == (3, N, 8) and s.top_p.dtype == torch.float32


@pytest.mark.parametrize("kw, field", [
    ({"pc_lambda": -0.1}, "pc_lambda"), ({"exit_high": 1.5}, "exit_high"),
    ({"exit_high": 0.5, "exit_low": 0.8}, "exit_low"), ({"exit_low": 0.5}, "exit_low"),
    ({"kl_threshold": 0.0}, "kl_threshold"), ({"kl_history": 2}, "kl_history"),
    ({"kl_threshold": 0.01, "kl_history": 0}, "kl_history"),
    ({"revoke_threshold": 0.0}, "revoke_threshold"),
    ({"pc_lambda": 0.2, "revoke_threshold": 0.9}, "revoke_threshold"),
])
def test_policy_knob_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(**kw)


def test_policy_names():
    assert SamplingParams(pc_lambda=0.25).policy == "pc_sampler"
    # a hand-set threshold wins over PC-Sampler / SchED (a speed preset plus the user's knob)
    assert SamplingParams(pc_lambda=0.25, threshold=0.95).policy == "threshold"
    assert SamplingParams(exit_high=0.9).policy == "sched_exit"
    assert SamplingParams(kl_threshold=0.015).policy == "klass"
    assert SamplingParams(revoke_threshold=0.9, threshold=0.6).policy == "wino"
