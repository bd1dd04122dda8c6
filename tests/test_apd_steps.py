"""APD step functions (batched mixture acceptance, window rule, knob errors) and loop invariants."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfastllm_ray.models.loader import load_model
from dfastllm_ray.sampling.apd import APDParams, apd_accept_length, apd_window
from dfastllm_ray.sampling.apd_generate import apd_generate


def test_batched_ragged_acceptance_equals_rows_alone():
    """Rows with different R and draft lengths decided in one call == one call per row."""
    g = torch.Generator().manual_seed(0)
    b, n, v = 5, 6, 11
    d = torch.randn(b, n, v, generator=g)
    ver = torch.randn(b, n, v, generator=g)
    weights = [0.3, 0.5, 0.7, 0.9, 1.0]
    target = torch.stack([w * d[i] + (1 - w) * ver[i] for i, w in enumerate(weights)]).argmax(-1)
    draft = target.clone()
    draft[0, 3], draft[1, 1], draft[2, 0] = (draft[0, 3] + 1) % v, (draft[1, 1] + 1) % v, 0
    lengths = torch.tensor([6, 4, 2, 5, 3])
    got = apd_accept_length(draft, d, ver, weights, lengths)
    for i, w in enumerate(weights):
        m = int(lengths[i])
        alone = apd_accept_length(draft[i:i + 1, :m], d[i:i + 1, :m], ver[i:i + 1, :m], w)
        assert int(got[i]) == int(alone[0])
    assert got[0] == 3 and got[1] == 1 and got[3] == 5 and got[4] == 3
    assert got[2] >= 1                                  # the first draft token is always kept


def test_weight_one_is_the_drafter_alone_and_the_vocab_is_cut():
    """R = 1: the target is the dLLM's argmax; dLLM columns past the verifier's vocab are cut."""
    d = torch.tensor([[[0.0, 1.0, 9.0], [2.0, 0.0, 9.0], [0.0, 3.0, 9.0]]])   # col 2: not in Vv
    ver = torch.zeros(1, 3, 2)
    assert int(apd_accept_length(torch.tensor([[1, 0, 1]]), d, ver, 1.0)[0]) == 3
    with pytest.raises(ValueError, match="vocabulary 3 < the verifier's 4"):
        apd_accept_length(torch.tensor([[1, 0, 1]]), d, torch.zeros(1, 3, 4), 1.0)


def test_window_rule():
    p = APDParams(max_new_tokens=32, apd_mixture_weight=0.5, kv_window=4, max_lookahead=8)
    assert apd_window(10, 40, p, prev_accept=3, cached=False) == (0, 18)
    assert apd_window(10, 40, p, prev_accept=3, cached=True) == (4, 18)     # 10 - 4 - 3 + 1
    assert apd_window(36, 40, p, prev_accept=1, cached=True) == (32, 40)
    free = APDParams(max_new_tokens=32, apd_mixture_weight=0.5, kv_window=4)
    assert apd_window(10, 40, free, prev_accept=1, cached=True) == (6, 40)


@pytest.mark.parametrize("kwargs,match", [
    (dict(apd_mixture_weight=1.5), r"apd_mixture_weight=1.5 is invalid: it must be a float in"),
    (dict(apd_mixture_weight=0.5, kv_window=0), r"kv_window=0 is invalid"),
    (dict(), r"tokens_per_step=None is invalid: it must be an int >= 1 when apd_mixture_weight"),
    (dict(tokens_per_step=4, max_lookahead=2), r"tokens_per_step=4 is invalid: it must be at most"),
])
def test_bad_knobs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APDParams(max_new_tokens=8, **kwargs)


# ---- the loop's invariants, with a Dream and a LLaDA drafter over the verifier's vocabulary --

FIXTURES = Path(__file__).parent / "fixtures"
DRAFTERS = {"dream": FIXTURES / "apd" / "apd-tiny" / "dream",
            "llada": FIXTURES / "reference" / "llada-tiny"}


@pytest.fixture(scope="module")
def verifier():
    return load_model(FIXTURES / "apd" / "apd-tiny" / "verifier", dtype="float32", device="cpu")


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_drafter_families(name, verifier):
    """Dream (shifted logits) and LLaDA (unshifted) drafters. R = 1: the target is the
    drafter's own argmax, so the first step accepts the whole canvas; R = 0.5 with M = 5:
    every step commits 1..5 tokens left to right, one forward of each model per step."""
    drafter = load_model(DRAFTERS[name], dtype="float32", device="cpu")
    prompt = torch.tensor([[408, 323, 227, 451, 406, 370]])
    ones = apd_generate(drafter.model, drafter.spec, verifier.model, prompt,
                        APDParams(max_new_tokens=16, apd_mixture_weight=1.0))
    assert ones.acceptance_counts == [16] and ones.verifier_forwards == 1
    out = apd_generate(drafter.model, drafter.spec, verifier.model, prompt,
                       APDParams(max_new_tokens=16, apd_mixture_weight=0.5, max_lookahead=5))
    filled = int((out.sequences[0] != drafter.spec.mask_token_id).sum())
    assert filled - prompt.shape[1] == out.tokens_generated
    assert all(1 <= a <= 5 for a in out.acceptance_counts)
    assert out.dream_forwards == out.verifier_forwards == len(out.acceptance_counts)
