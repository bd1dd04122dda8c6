"""Dream-specific properties of the reference loop and its step functions.

The manifest cases themselves (ours == official, token for token) run in the shared
fixture-driven harness, which hands Dream kinds to `reference_dream.run_dream_case`. Here,
over the same manifests (root: $DFASTLLM_REFERENCE_DIR, default tests/fixtures/reference):
- every row of an unseeded multi-row no-cache case, run alone and unpadded, equals that row of
  the official batch output (for the left-padded cases this is "padded == unpadded"). Seeded cases
  are left out by design: the official draws (rand / multinomial) run over the whole batch, so a
  row alone consumes the RNG differently;
- left-padded rows equal their prompts run unpadded in the cached (prefix / dual) and threshold
  modes too, which the official Fast-dLLM code cannot run with padding;
- the pure step functions' quirks, on hand-made tensors.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfastllm_ray.sampling import dream as D
from dfastllm_ray.sampling.candidates import Candidates
from dfastllm_ray.sampling.dream_generate import dream_generate
from dfastllm_ray.sampling.params import SamplingParams
from reference_dream import DREAM_KINDS, case_inputs
from reference_harness import load_fixture, manifest_folders, read_manifest


def dream_folders() -> list[Path]:
    return [f for f in manifest_folders()
            if any(c["kind"] in DREAM_KINDS for c in read_manifest(f)["cases"])]


def row_cases() -> list:
    out = []
    for folder in dream_folders():
        for case in read_manifest(folder)["cases"]:
            if case["kind"] == "dream_diffusion_generate" and case.get("seed") is None:
                out.append(pytest.param(folder, case, id=f"{folder.name}:{case['name']}"))
    return out


def unpadded(prompt: torch.Tensor, mask, row: int) -> torch.Tensor:
    return prompt[row:row + 1] if mask is None else prompt[row:row + 1, mask[row].bool()]


@pytest.mark.parametrize("folder,case", row_cases())
def test_each_row_alone_equals_the_official_batch_row(folder, case):
    fx = load_fixture(folder)
    T, loaded = fx.tensors, fx.loaded
    prompt, mask, params, cache = case_inputs(case, T)
    want = T[case["outputs"]["sequences"]]
    for row in range(prompt.shape[0]):
        alone = unpadded(prompt, mask, row)
        x, nfe = dream_generate(loaded.model, alone, params, spec=loaded.spec, cache=cache)
        assert torch.equal(x[0], want[row, -x.shape[1]:]), f"row {row} differs"
        assert nfe == case["nfe"]


PADDED_MODES = {
    "threshold": (dict(alg="maskgit_plus", threshold=0.9, steps=16), None),
    "prefix-threshold": (dict(alg="maskgit_plus", threshold=0.9, steps=32, block_length=8),
                         "prefix"),
    "dual-entropy": (dict(alg="entropy", steps=32, block_length=8), "dual"),
    "prefix-maskgit": (dict(alg="maskgit_plus", steps=16, block_length=8), "prefix"),
}


@pytest.mark.parametrize("mode", sorted(PADDED_MODES))
def test_padded_rows_equal_unpadded_in_fastdllm_modes(mode):
    fx = load_fixture(dream_folders()[0])
    T, loaded = fx.tensors, fx.loaded
    knobs, cache = PADDED_MODES[mode]
    params = SamplingParams(max_tokens=32, **knobs)
    prompt, mask = T["gen.prompt_padded"], T["gen.attention_mask_padded"]
    batch, _ = dream_generate(loaded.model, prompt, params, spec=loaded.spec, attention_mask=mask,
                              cache=cache)
    for row in range(prompt.shape[0]):
        alone, _ = dream_generate(loaded.model, unpadded(prompt, mask, row), params,
                                  spec=loaded.spec, cache=cache)
        assert torch.equal(batch[row, -32:], alone[0, -32:]), f"row {row} differs"


# ---- step functions ---------------------------------------------------------------------------

def test_quota_truncates_a_float32_product_and_takes_all_on_the_last_step():
    # 32 masks over 32 steps: step 0 commits int(32 * (1 - t1/t0)) = 0, the last step the rest
    assert D.dream_quota(32, 0, 32, 1e-3) == 0
    left = 32
    for i in range(32):
        left -= D.dream_quota(left, i, 32, 1e-3)
    assert left == 0
    assert D.dream_quota(torch.tensor(63) / 2, 31, 32, 1e-3) == 31     # batch mean 31.5 -> 31


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = D.top_p_logits(logits, 0.6) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False]]


def test_confidence_is_renormalised_after_filtering():
    logits = torch.randn(4, 50)
    conf, x0 = D.sample_tokens(logits, top_k=1)
    assert torch.equal(x0, logits.argmax(-1)) and torch.allclose(conf, torch.ones(4))


def test_categorical_draw_equals_torch_distributions():
    probs = torch.softmax(torch.randn(16, 50), -1)
    torch.manual_seed(7)
    want = torch.distributions.Categorical(probs=probs).sample()
    torch.manual_seed(7)
    assert torch.equal(D.categorical(probs), want)


def test_margin_and_entropy_confidences_keep_the_argmax_token():
    logits = torch.randn(5, 30)
    for alg in ("topk_margin", "entropy"):
        cand = D.propose_dream(logits, SamplingParams(alg=alg))
        assert torch.equal(cand.tokens, logits.argmax(-1))
    cand = D.propose_dream(logits, SamplingParams(alg="entropy"))
    assert torch.allclose(cand.entropy, -cand.conf) and bool((cand.entropy >= 0).all())


def cands(conf: list[float]) -> Candidates:
    c = torch.tensor(conf, dtype=torch.float64)
    return Candidates(torch.arange(len(conf)), c, -c)


def test_threshold_keeps_the_most_confident_even_below_threshold():
    params = SamplingParams(alg="maskgit_plus", threshold=0.9)
    commit = D.select_confidence_threshold(cands([0.2, 0.5, 0.95, 0.1]), 3, params)
    assert commit.tolist() == [False, False, True, False]
    commit = D.select_confidence_threshold(cands([0.92, 0.5, 0.95, 0.1]), 3, params)
    assert commit.tolist() == [True, False, True, False]


def test_threshold_carry_extends_the_run_by_one_step_per_last_step_drop():
    sched = D.ThresholdCarry(per_step=2, steps=2)
    sched.update(0, sched.quota(), 1)          # one dropped: carried
    assert sched.quota() == 3
    sched.update(1, 3, 1)                      # two dropped on the last step: ONE more step
    assert (sched.steps, sched.quota()) == (3, 2)


def test_alg_temp_draws_only_masked_positions():
    params = SamplingParams(alg="maskgit_plus", alg_temp=0.5)
    conf = [float("-inf"), 0.3, float("-inf"), 0.9, 0.1]
    commit = D.select_alg_temp(cands(conf), 3, params, torch.Generator().manual_seed(0))
    assert commit.tolist() == [False, True, False, True, True]


def test_policy_names():
    assert D.dream_policy(SamplingParams(alg="origin")) == "dream_origin"
    assert D.dream_policy(SamplingParams(alg="entropy", alg_temp=0.0)) == "dream_topk"
    assert D.dream_policy(SamplingParams(alg="entropy", alg_temp=0.5)) == "dream_alg_temp"
    assert D.dream_policy(SamplingParams(alg="entropy", threshold=0.9)) == "dream_threshold"
    assert set(D.DREAM_POLICIES) == {"dream_origin", "dream_topk", "dream_alg_temp",
                                     "dream_threshold"}
