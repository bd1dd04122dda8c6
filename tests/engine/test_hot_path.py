"""The step's host-time shortcuts change no decision: the tiled CPU argmax is `argmax`, the
argmax one-hot is the stable sort's rank 0, the dense candidate index selects exactly the
candidates the device finds, and a window reused across a block's steps equals a fresh one."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dfastllm_ray.engine import model_runner, step_inputs
from dfastllm_ray.sampling.batch_policies import Ranked
from dfastllm_ray.sampling.batch_propose import ARGMAX_TILE, argmax_last, argmax_tiled
from dfastllm_ray.sampling.params import SamplingParams
from engine_models import engine, run_all


@pytest.mark.parametrize("shape", [(3, 5, 4 * ARGMAX_TILE), (2, 1, 33 * ARGMAX_TILE),
                                   (4, 7, 100), (0, 3, 2 * ARGMAX_TILE)])
def test_tiled_argmax_is_argmax_with_ties_nan_and_inf(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, shape, generator=g).float()      # many equal maxima
    if x.numel():
        x[0, 0] = float("-inf")                              # a row of -inf: index 0
        x[-1, -1, -1] = float("nan")                         # NaN wins, as in argmax
        x[-1, 0, 3] = x[-1, 0, -2] = 9.0                     # equal maxima in two tiles
    assert torch.equal(argmax_tiled(x), x.argmax(dim=-1))
    assert torch.equal(argmax_tiled(x.double()), x.double().argmax(dim=-1))
    assert torch.equal(argmax_last(x), x.argmax(dim=-1))       # by size: one argmax or tiles


def test_argmax_one_hot_is_the_stable_sort_rank_zero():
    g = torch.Generator().manual_seed(1)
    conf = torch.randint(0, 3, (6, 9), generator=g).float()  # ties
    conf[2] = float("-inf")
    first = Ranked(conf, lambda: None, None).first
    sorted_first = Ranked(conf, lambda: None, None)
    assert torch.equal(first, sorted_first.rank == 0)
    assert first.sum(1).tolist() == [1] * 6


def test_dense_index_lists_each_rows_first_slots():
    got = step_inputs.dense_index(np.array([2, 0, 3, 5]), 4)         # 5 > n_max: clipped
    assert got.tolist() == [0, 1, 8, 9, 10, 12, 13, 14, 15]
    assert step_inputs.dense_index(np.array([0, 0]), 1).tolist() == []


CASES = [("llada-tiny", "dual", dict(threshold=0.9)), ("llada-tiny", "prefix", dict()),
         ("llada-tiny", "none", dict(factor=1.0)), ("dream-tiny", "dual", dict(threshold=0.9)),
         ("dream-tiny", "none", dict())]


def _requests(eng, params: SamplingParams, n: int) -> dict:
    rng = random.Random(3)
    vocab = eng.spec.vocab_size
    return {str(i): ([rng.randrange(1, vocab - 8) for _ in range(rng.randint(4, 12))], params)
            for i in range(n)}


@pytest.mark.parametrize("model,mode,knobs", CASES)
def test_host_counts_are_the_device_candidates(model, mode, knobs, monkeypatch):
    """The dense index relies on it: each row's host count (its mask counter) is the number of
    candidates the device finds in its range, at every step, blocks staggered."""
    eng = engine(model, mode, max_num_seqs=8)
    seen = []
    expand = model_runner.expand_group

    def checked(plan, *a, **k):
        inputs = expand(plan, *a, **k)
        want = [min(i.num_candidates, plan.n_max) for i in plan.items]
        if plan.kind != "prefill":
            assert inputs.knobs.valid.sum(1).tolist() == want, plan.kind
            seen.append(plan.kind)
        return inputs

    monkeypatch.setattr(model_runner, "expand_group", checked)
    params = SamplingParams(max_tokens=16, block_length=8, **knobs)
    run_all(eng, _requests(eng, params, 6), stagger=2)
    assert seen


@pytest.mark.parametrize("model,mode,knobs", CASES[:2] + CASES[3:4])
def test_reused_windows_equal_fresh_ones(model, mode, knobs, monkeypatch):
    params = SamplingParams(max_tokens=16, block_length=8, **knobs)
    cached = engine(model, mode, max_num_seqs=8)
    want = run_all(cached, _requests(cached, params, 6), stagger=2)
    assert cached.runner.windows.hits > 0            # the reuse path ran
    monkeypatch.setattr(step_inputs.WindowCache, "get",
                        lambda self, g, batch, pool, im, shift: step_inputs.build_window(g, batch, pool,
                                                                           im, shift))
    fresh = engine(model, mode, max_num_seqs=8)
    got = run_all(fresh, _requests(fresh, params, 6), stagger=2)
    assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in want.items()}
    assert {k: v.nfe for k, v in got.items()} == {k: v.nfe for k, v in want.items()}


GREEDY = {"llada-tiny": [{}, {"threshold": 0.5}, {"factor": 1.0}, {"entropy_bound": 2.0},
                         {"remasking": "random", "seed": 7}],
          "dream-tiny": [{"alg": "maskgit_plus"}, {"alg": "origin", "seed": 5},
                         {"alg": "maskgit_plus", "threshold": 0.5}, {"alg": "entropy"}]}


@pytest.mark.parametrize("model,mode", [("llada-tiny", "dual"), ("llada-tiny", "none"),
                                        ("dream-tiny", "dual")])
@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_dense_candidates_decide_as_the_padded_layout(model, mode, which, monkeypatch):
    """The greedy rules over the N real candidates == over the (B, n_max) padded layout."""
    from dfastllm_ray.engine import sampler
    knobs = GREEDY[model][which:which + 2]           # a group of two settings
    eng = engine(model, mode, max_num_seqs=8)
    reqs = {rid: (prompt, SamplingParams(max_tokens=16, block_length=8, **knobs[i % len(knobs)]))
            for i, (rid, (prompt, _)) in enumerate(_requests(eng, None, 6).items())}
    want = run_all(eng, reqs, stagger=2)
    propose = sampler.propose_batch
    monkeypatch.setattr(sampler, "propose_batch",
                        lambda *a, **k: propose(*a[:5]))      # no dense index: padded layout
    got = run_all(engine(model, mode, max_num_seqs=8), reqs, stagger=2)
    assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in want.items()}
    assert {k: v.nfe for k, v in got.items()} == {k: v.nfe for k, v in want.items()}


@pytest.fixture
def deterministic_torch():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("model,mode", [("llada-tiny", "none"), ("llada-tiny", "dual"),
                                        ("dream-tiny", "dual")])
def test_the_step_runs_under_deterministic_algorithms(model, mode, deterministic_torch):
    """A process that set torch.use_deterministic_algorithms(True) (the trainer does) gets the
    same tokens: no op of the step lacks a deterministic kernel (put_ did)."""
    reqs = {f"r{i}": (list(range(3 + i, 9 + 2 * i)), SamplingParams(max_tokens=16, block_length=8,
                                                                   steps=8, threshold=0.9))
            for i in range(3)}
    got = run_all(engine(model, mode), reqs)
    torch.use_deterministic_algorithms(False)
    ref = run_all(engine(model, mode), reqs)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in ref.items()}
