"""Speculative drafting is lossless: greedy-exact at temperature 0, the AR distribution above 0.

Two drafters over the verifier's vocabulary, both real `DreamModel`s: the APD fixture's tiny
Dream (random weights: it almost never agrees with the verifier, so rejections and resampling
dominate), and a "mirror" Dream holding the verifier's own weights, run bidirectionally with the
Dream logit shift (it often agrees on the first draft positions, so acceptance runs of every
length and bonus tokens occur). The verifier is the fixture's tiny Qwen2.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dfastllm_ray.models.dream import DreamModel
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.sampling.ar_generate import ar_generate, sample_from, target_probs
from dfastllm_ray.sampling.speculative import (SpeculativeParams, next_draft_length,
                                               speculative_accept, speculative_generate)

PAIR = Path(__file__).parent / "fixtures" / "apd" / "apd-tiny"


@pytest.fixture(scope="module")
def models():
    dream = load_model(PAIR / "dream", dtype="float32", device="cpu")
    ver = load_model(PAIR / "verifier", dtype="float32", device="cpu")
    spec = replace(ver.spec, arch="dream", causal=False, logits_shift=True,
                   mask_token_id=dream.spec.mask_token_id)
    mirror = DreamModel(spec, tie_word_embeddings=False).eval()
    mirror.load_state_dict(ver.model.state_dict())
    return {"fixture-dream": (dream.model, dream.spec), "mirror-dream": (mirror, spec)}, ver


def prompts(n: int, seed: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (1, n_), generator=g) for n_ in lengths]


# ---- the accept / resample rule alone ------------------------------------------------------

def test_temperature_zero_rule_is_accept_while_argmax():
    p = target_probs(torch.tensor([[[0., 5, 1], [3, 0, 1], [0, 0, 9]]]), 0.0)   # argmax 1, 0, 2
    q = target_probs(torch.tensor([[[0., 5, 1], [0, 4, 1]]]), 0.0)               # drafts 1, 1
    zeros2, zero = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    n, nxt = speculative_accept(torch.tensor([[1, 1]]), q, p, zeros2, zero)
    assert (n.item(), nxt.item()) == (1, 0)            # second draft rejected, AR argmax instead
    n, nxt = speculative_accept(torch.tensor([[1, 0]]), q, p, zeros2, zero)
    assert (n.item(), nxt.item()) == (2, 2)            # all accepted: bonus token from p_k


def test_ragged_batch_equals_rows_alone():
    g = torch.Generator().manual_seed(0)
    b, k, v = 6, 5, 7
    q = torch.softmax(torch.randn(b, k, v, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(torch.randn(b, k + 1, v, generator=g, dtype=torch.float64), -1)
    draft = sample_from(q, torch.rand(b, k, generator=g, dtype=torch.float64))
    ua = torch.rand(b, k, generator=g, dtype=torch.float64)
    un = torch.rand(b, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    n, nxt = speculative_accept(draft, q, p, ua, un, lengths)
    for i, m in enumerate(lengths.tolist()):
        p_row = torch.cat([p[i:i + 1, :m], p[i:i + 1, m:m + 1]], 1)           # bonus row at m
        ni, xi = speculative_accept(draft[i:i + 1, :m], q[i:i + 1, :m], p_row, ua[i:i + 1, :m],
                                    un[i:i + 1])
        assert (n[i].item(), nxt[i].item()) == (ni.item(), xi.item())


def first_token(draft, n, nxt):
    return torch.where(n > 0, draft[:, 0], nxt)


def broken_accept_all(draft, q, p, ua, un, lengths=None):
    """Deliberately wrong: every draft is kept (the output follows the drafter)."""
    return speculative_accept(draft, q, p, torch.zeros_like(ua), un, lengths)


def broken_resample_target(draft, q, p, ua, un, lengths=None):
    """Deliberately wrong: resample a rejection from p instead of the residual max(0, p - q)."""
    n, _ = speculative_accept(draft, q, p, ua, un, lengths)
    return n, sample_from(p[torch.arange(len(n)), n], un)


def test_rule_reproduces_the_target_exactly_in_a_large_batch():
    """200k independent one-token trials in one batched call: the first committed token's
    frequencies match p to within sampling noise; a broken rule's do not."""
    g = torch.Generator().manual_seed(1)
    n_trials, v = 200_000, 5
    p1 = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    q1 = torch.tensor([0.3, 0.1, 0.4, 0.05, 0.15], dtype=torch.float64)
    p = p1.expand(n_trials, 2, v)
    q = q1.expand(n_trials, 1, v)
    draft = sample_from(q, torch.rand(n_trials, 1, generator=g, dtype=torch.float64))
    ua = torch.rand(n_trials, 1, generator=g, dtype=torch.float64)
    un = torch.rand(n_trials, generator=g, dtype=torch.float64)
    for rule, ok in ((speculative_accept, True), (broken_resample_target, False)):
        tok = first_token(draft, *rule(draft, q, p, ua, un))
        freq = torch.bincount(tok, minlength=v).double() / n_trials
        assert bool((freq - p1).abs().max() < 0.005) is ok, (rule.__name__, freq)


# ---- the loop -------------------------------------------------------------------------------

def test_temperature_zero_equals_ar_greedy_on_200_prompts(models):
    """200 prompts x draft_tokens 1, 3 and 6 (adaptive); the two drafters alternate."""
    drafters, ver = models
    accepted = {name: [] for name in drafters}
    for i, prompt in enumerate(prompts(200, seed=7, vocab=497)):
        name = sorted(drafters)[i % 2]
        model, spec = drafters[name]
        ref = ar_generate(ver.model, ver.spec, prompt, 8).tokens
        for params in (SpeculativeParams(8, 1), SpeculativeParams(8, 3),
                       SpeculativeParams(8, 6, adaptive=True)):
            out = speculative_generate(model, spec, ver.model, ver.spec, prompt, params)
            assert out.tokens == ref, (name, i, params)
            assert out.drafter_forwards == out.verifier_forwards == len(out.accepted)
            assert sum(out.accepted) + len(out.accepted) >= len(out.tokens)
            accepted[name] += out.accepted
    mirror = accepted["mirror-dream"]                 # acceptance paths were exercised
    assert sum(a > 0 for a in mirror) > 50 and max(mirror) >= 2


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; bins expected < 5 pooled into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2))


def first_two_marginals(ver, prompt: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact AR marginals of generated tokens 1 and 2 (token 2: sum over every token 1; after an
    EOS first token generation stops, and token 2 is counted as that EOS again)."""
    eos = ver.spec.eos_token_id
    with torch.no_grad():
        p1 = target_probs(ver.model(prompt)[0, -1], t)
        v = p1.shape[0]
        both = torch.cat([prompt.expand(v, -1), torch.arange(v)[:, None]], 1)
        cond = target_probs(ver.model(both)[:, -1], t)                 # (V, V): p(t2 | t1)
        cond[eos] = torch.nn.functional.one_hot(torch.tensor(eos), v).double()
        p2 = (p1[:, None] * cond).sum(0)
    return p1, p2


def sampled_first_two(models, drafter, rule, n: int, t: float, prompt) -> torch.Tensor:
    drafters, ver = models
    model, spec = drafters[drafter]
    g = torch.Generator().manual_seed(1234)
    params = SpeculativeParams(max_new_tokens=2, draft_tokens=3, temperature=t)
    toks = [speculative_generate(model, spec, ver.model, ver.spec, prompt, params, g,
                                 accept=rule).tokens for _ in range(n)]
    return torch.tensor([tk + [tk[-1]] * (2 - len(tk)) for tk in toks])   # (n, 2); EOS repeated


PROMPT, TEMPERATURE = torch.tensor([[17, 250, 3, 88, 401]]), 1.0


@pytest.mark.parametrize("drafter", ["fixture-dream", "mirror-dream"])
def test_sampled_tokens_follow_the_ar_distribution(models, drafter):
    """1200 seeded runs of the loop: chi-square does not reject the AR marginals of the first
    two generated tokens (the second often comes from an accepted draft or a bonus token)."""
    p1, p2 = first_two_marginals(models[1], PROMPT, TEMPERATURE)
    toks = sampled_first_two(models, drafter, speculative_accept, 1200, TEMPERATURE, PROMPT)
    for j, probs in ((0, p1), (1, p2)):
        pval = chi2_pvalue(torch.bincount(toks[:, j], minlength=len(p1)).double(), probs)
        assert pval > 1e-3, (drafter, j, pval)


def test_a_broken_acceptance_rule_is_rejected(models):
    """The same test on a rule that keeps every draft: rejected with 400 runs."""
    p1, _ = first_two_marginals(models[1], PROMPT, TEMPERATURE)
    bad = sampled_first_two(models, "fixture-dream", broken_accept_all, 400, TEMPERATURE, PROMPT)
    assert chi2_pvalue(torch.bincount(bad[:, 0], minlength=len(p1)).double(), p1) < 1e-6


def test_adaptive_draft_length_rule():
    assert next_draft_length(4, 4, cap=8) == 6 and next_draft_length(7, 7, cap=8) == 8
    assert next_draft_length(4, 2, cap=8) == 3 and next_draft_length(1, 0, cap=8) == 1


def test_bad_params_are_named():
    with pytest.raises(ValueError, match=r"draft_tokens=0 is invalid: it must be an int >= 1"):
        SpeculativeParams(max_new_tokens=4, draft_tokens=0)
    with pytest.raises(ValueError, match=r"temperature=-1.0 is invalid"):
        SpeculativeParams(max_new_tokens=4, temperature=-1.0)
