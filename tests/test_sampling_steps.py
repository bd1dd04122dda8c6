"""The step-level pieces shared by the reference loops and the engine: noise, schedule, propose,
policies (docs/DESIGN.md, "The step-level decoding contract"). CPU, milliseconds."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dfastllm_ray.models.spec import ModelSpec
from dfastllm_ray.sampling import POLICIES, Candidates, SamplingParams
from dfastllm_ray.sampling.propose import propose
from dfastllm_ray.sampling.noise import add_gumbel_noise, uniform
from dfastllm_ray.sampling.policies import entropy_bound, factor, fixed, threshold
from dfastllm_ray.sampling.schedule import get_num_transfer_tokens, transfer_counts

EOS, EOT, V = 5, 6, 8
SPEC = ModelSpec(arch="llada", vocab_size=V, hidden_size=4, num_layers=1, num_heads=1,
                 num_kv_heads=1, head_dim=4, intermediate_size=4, rope_theta=1e4,
                 rms_norm_eps=1e-5, max_position=64, qkv_bias=False, mask_token_id=7,
                 eos_token_id=EOS, pad_token_id=EOS, eot_token_id=EOT)


def cands(conf, entropy=None) -> Candidates:
    conf = torch.tensor(conf, dtype=torch.float64)
    ent = torch.zeros_like(conf) if entropy is None else torch.tensor(entropy, dtype=torch.float64)
    return Candidates(torch.arange(len(conf)), conf, ent)


def test_zero_temperature_returns_the_same_tensor_object():
    logits = torch.randn(3, V)
    assert add_gumbel_noise(logits, 0.0) is logits       # ML-GSAI's aliasing, relied upon


def test_gumbel_draw_equals_the_official_rand_like_in_float64():
    logits = torch.randn(2, 3, V)
    torch.manual_seed(7)
    ours = add_gumbel_noise(logits, 0.7)
    torch.manual_seed(7)
    l64 = logits.double()
    official = l64.exp() / (-torch.log(torch.rand_like(l64))) ** 0.7
    assert ours.dtype == torch.float64 and torch.equal(ours, official)


def test_per_request_generator_is_reproducible_and_leaves_the_global_rng_alone():
    logits = torch.randn(4, V)
    p = SamplingParams(temperature=1.0, remasking="random")
    state = torch.get_rng_state()
    a = propose(logits, p, torch.Generator().manual_seed(3))
    b = propose(logits, p, torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.conf, b.conf)
    assert torch.equal(torch.get_rng_state(), state)
    assert uniform((2,), torch.Generator().manual_seed(1)).dtype == torch.float64


def test_transfer_schedule_front_loads_the_remainder():
    assert transfer_counts(8, 3) == [3, 3, 2]
    assert transfer_counts(2, 4) == [1, 1, 0, 0]              # steps > masks: empty steps
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    assert get_num_transfer_tokens(mask, 3).tolist() == [[3, 3, 2], [2, 2, 1]]


@pytest.mark.parametrize("conf_dtype", [torch.float32, torch.float64])
def test_confidence_is_the_noise_free_probability_of_the_chosen_token(conf_dtype):
    logits = torch.randn(5, V)
    cand = propose(logits, SamplingParams(), conf_dtype=conf_dtype)
    probs = torch.softmax(logits.to(conf_dtype), -1)
    assert torch.equal(cand.tokens, logits.argmax(-1))
    assert torch.equal(cand.conf, probs.max(-1).values.double())
    ent = -(probs.double() * probs.double().log()).sum(-1)
    assert torch.allclose(cand.entropy, ent)


def test_logits_eos_inf_never_proposes_eos_and_needs_the_spec():
    logits = torch.zeros(3, V)
    logits[:, EOS] = 10.0
    p = SamplingParams(logits_eos_inf=True)
    assert (propose(logits, p, spec=SPEC).tokens != EOS).all()
    with pytest.raises(ValueError, match="logits_eos_inf"):
        propose(logits, p)


def test_confidence_eos_eot_inf_quirk_depends_on_temperature():
    """ML-GSAI's chained assignment: EOS and EOT lose confidence at T = 0, only EOT at T > 0."""
    logits = torch.full((2, V), -30.0)
    logits[0, EOS] = logits[1, EOT] = 30.0                    # rows pick EOS / EOT for sure
    greedy = SamplingParams(confidence_eos_eot_inf=True)
    cand = propose(logits, greedy, spec=SPEC)
    assert cand.tokens.tolist() == [EOS, EOT] and cand.conf.tolist() == [0.0, 0.0]
    torch.manual_seed(0)
    hot = propose(logits, replace(greedy, temperature=0.5), spec=SPEC)
    assert hot.tokens.tolist() == [EOS, EOT] and hot.conf[0] > 0.99 and hot.conf[1] == 0.0


def test_every_policy_commits_at_least_one_and_only_candidates():
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(threshold=0.99, factor=0.5, entropy_bound=0.1)
    llada = {k: POLICIES[k] for k in ("fixed", "threshold", "factor", "entropy_bound")}
    for trial in range(200):
        n = int(torch.randint(0, 9, (), generator=g))
        cand = cands(torch.rand(n, generator=g).tolist(), (3 * torch.rand(n, generator=g)).tolist())
        quota = int(torch.randint(0, 4, (), generator=g))
        for name, policy in llada.items():
            commit = policy(cand, quota, params, g)
            assert commit.dtype == torch.bool and commit.shape == (n,), name
            assert int(commit.sum()) >= min(n, 1), (name, trial)


def test_fixed_takes_the_quota_most_confident():
    assert fixed(cands([0.1, 0.9, 0.5, 0.7]), 2, SamplingParams(), None).tolist() == [
        False, True, False, True]


def test_threshold_adds_the_most_confident_below_threshold():
    p = SamplingParams(threshold=0.9)
    assert threshold(cands([0.2, 0.95, 0.91]), 0, p, None).tolist() == [False, True, True]
    assert threshold(cands([0.2, 0.5]), 0, p, None).tolist() == [False, True]


def test_factor_rule_and_its_last_position_quirk():
    p = SamplingParams(factor=1.0)            # thresholds -1, 1-1/3, 1-1/4, 1-1/5, ...
    assert factor(cands([0.9, 0.7, 0.6, 0.5]), 0, p, None).sum() == 2   # fails at j=2 -> k=2
    # fails only at the last position: k = n-1 -> n, the failing position is committed too
    assert factor(cands([0.99, 0.99, 0.1]), 0, p, None).all()
    assert factor(cands([0.99, 0.99, 0.99]), 0, p, None).all()            # none fails -> all


def test_entropy_bound_commits_lowest_entropy_within_the_bound():
    p = SamplingParams(entropy_bound=0.5)
    cand = cands([0.5] * 4, [0.3, 0.1, 2.0, 0.15])
    assert entropy_bound(cand, 0, p, None).tolist() == [False, True, False, True]
    assert entropy_bound(cands([0.5], [9.0]), 0, p, None).tolist() == [True]   # at least one


def test_policy_names_follow_the_params():
    assert SamplingParams().policy == "fixed"
    assert SamplingParams(threshold=0.9).policy == "threshold"
    assert SamplingParams(threshold=0.9, factor=1.0).policy == "factor"     # Fast-dLLM: factor wins
    assert SamplingParams(entropy_bound=1.0).policy == "entropy_bound"
    for p in (SamplingParams(), SamplingParams(alg="entropy"), SamplingParams(alg="origin")):
        assert p.policy in POLICIES
