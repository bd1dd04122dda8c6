"""Hybrid decoding in the engine: APD equals `apd_generate` on every deterministic case of every
APD fixture pair (root `$DFASTLLM_APD_REFERENCE_DIR`, default tests/fixtures/apd), batched
requests with different R / W / M (and plain diffusion requests) equal each alone, and
speculative decoding at temperature 0 is the verifier's own greedy output."""
from __future__ import annotations

import random

import pytest
import torch

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.sampling.ar_generate import ar_generate
from dfastllm_ray.sampling.params import SamplingParams
from engine_models import run_all
from reference_apd import all_cases, load_pair

APD = [(f, n) for f, n in all_cases() if load_pair(f).case(n)["kind"] == "apd_diffusion_generate"
       and not load_pair(f).case(n)["kwargs"].get("temperature")]


def hybrid_engine(pair, use_cache: bool = False, **cfg) -> Engine:
    cfg = {"page_size": 4, "num_pages": 1024, "kv_cache_mode": "dual", "max_num_seqs": 64, **cfg}
    eng = Engine(pair.dream, EngineConfig(**cfg), verifier=pair.verifier)
    eng.drafter_cache = use_cache
    return eng


def apd_request(case: dict) -> SamplingParams:
    kw = case["kwargs"]
    return SamplingParams(max_tokens=kw["max_new_tokens"], decoding="apd",
                          apd_mixture_weight=kw["apd_mixture_weight"], kv_window=kw["kv_window"],
                          max_lookahead=kw["max_lookahead"], temperature=0.0)


def expected(pair, case: dict) -> tuple[list[int], bool]:
    """The reference's generated ids cut at the first EOS/EOT, and whether it hit one."""
    seq = pair.tensors[case["sequences"]][0].tolist()
    gen = seq[pair.tensors[case["prompt"]].shape[1]:]
    stops = pair.dream.spec.stop_token_ids
    cut = next((i for i, t in enumerate(gen) if t in stops), None)
    return gen[:cut], cut is not None


@pytest.mark.parametrize("folder,name", APD, ids=[n for _, n in APD])
def test_engine_apd_equals_apd_generate(folder, name):
    pair = load_pair(folder)
    case = pair.case(name)
    use_cache = case.get("config_use_cache", pair.dream_config.get("use_cache", False))
    eng = hybrid_engine(pair, use_cache)
    prompt = pair.tensors[case["prompt"]][0].tolist()
    out = run_all(eng, {"a": (prompt, apd_request(case))})["a"]
    want, stopped = expected(pair, case)
    assert out.token_ids == want
    if not stopped:              # the engine also stops at end-of-turn; the official loop does not
        assert out.nfe == case["nfe_diffusion"]
        assert out.verifier_forwards == case["verifier_forwards"]
    assert eng.runner.hybrid.allocator.num_free_pages == eng.runner.hybrid.allocator.num_pages


def test_mixed_batch_of_apd_speculative_and_diffusion_equals_each_alone():
    folder = APD[0][0]
    pair = load_pair(folder)
    cases = [pair.case(n) for f, n in APD if f == folder and
             not pair.case(n).get("config_use_cache")][:8]
    reqs = {c["name"]: (pair.tensors[c["prompt"]][0].tolist(), apd_request(c)) for c in cases}
    rng = random.Random(0)
    for i in range(4):                      # plain diffusion and speculative requests beside them
        reqs[f"d{i}"] = ([rng.randrange(1, 200) for _ in range(rng.randint(3, 12))],
                         SamplingParams(max_tokens=16, block_length=8, alg="entropy"))
        reqs[f"s{i}"] = ([rng.randrange(1, 200) for _ in range(rng.randint(3, 12))],
                         SamplingParams(max_tokens=12, decoding="speculative", draft_tokens=i + 1,
                                        temperature=0.5 * (i % 2), seed=i))
    together = run_all(hybrid_engine(pair), reqs)
    staggered = run_all(hybrid_engine(pair), reqs, stagger=2)
    for rid, req in reqs.items():
        alone = run_all(hybrid_engine(pair), {rid: req})[rid]
        assert together[rid].token_ids == alone.token_ids == staggered[rid].token_ids, rid
        assert together[rid].nfe == alone.nfe


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_speculative_at_temperature_zero_is_the_verifier_greedy_output(draft_tokens):
    pair = load_pair(APD[0][0])
    rng = random.Random(draft_tokens)
    vocab = pair.verifier.spec.vocab_size
    prompts = {f"p{i}": [rng.randrange(1, vocab - 8) for _ in range(rng.randint(2, 10))]
               for i in range(70)}
    params = SamplingParams(max_tokens=12, decoding="speculative", draft_tokens=draft_tokens)
    outs = run_all(hybrid_engine(pair), {r: (p, params) for r, p in prompts.items()})
    stops = pair.verifier.spec.stop_token_ids
    for rid, prompt in prompts.items():
        greedy = greedy_without_mask(pair, prompt, 12)
        cut = next((i for i, t in enumerate(greedy) if t in stops), len(greedy))
        assert outs[rid].token_ids == greedy[:cut], rid
        assert outs[rid].verifier_forwards == outs[rid].nfe >= 1


@torch.no_grad()
def greedy_without_mask(pair, prompt: list[int], n: int) -> list[int]:
    """The verifier's greedy continuation over every token but the drafter's mask id (which a
    diffusion canvas cannot hold as a token), by full forwards: independent of any cache."""
    ids, mask_id = list(prompt), pair.dream.spec.mask_token_id
    for _ in range(n):
        logits = pair.verifier.model(torch.tensor([ids]))[0, -1]
        if mask_id < logits.shape[-1]:
            logits[mask_id] = float("-inf")
        ids.append(int(logits.argmax()))
        if ids[-1] in pair.verifier.spec.stop_token_ids:
            break
    return ids[len(prompt):]


def test_greedy_reference_matches_ar_generate_when_the_mask_id_never_wins():
    pair = load_pair(APD[0][0])
    prompt = [5, 9, 17, 3]
    ours = greedy_without_mask(pair, prompt, 8)
    theirs = ar_generate(pair.verifier.model, pair.verifier.spec, torch.tensor([prompt]), 8).tokens
    if pair.dream.spec.mask_token_id not in theirs:
        assert ours == theirs


def test_hybrid_decoding_without_a_verifier_is_refused():
    pair = load_pair(APD[0][0])
    eng = Engine(pair.dream, EngineConfig(page_size=4, num_pages=64))
    with pytest.raises(ValueError, match="needs a verifier"):
        eng.add_request("x", [5, 6, 7], SamplingParams(decoding="apd", apd_mixture_weight=0.5))


def _first_token_counts(pair, prompt, temperature: float, n: int) -> dict[int, int]:
    params = [SamplingParams(max_tokens=2, decoding="speculative", draft_tokens=2,
                             temperature=temperature, seed=s) for s in range(n)]
    outs = run_all(hybrid_engine(pair, max_num_seqs=256),
                   {str(s): (prompt, p) for s, p in enumerate(params)})
    counts: dict[int, int] = {}
    for o in outs.values():                 # an empty output: the first token was EOS / EOT
        first = o.token_ids[0] if o.token_ids else "stop"
        counts[first] = counts.get(first, 0) + 1
    return counts


def _chi_square(pair, prompt, temperature: float, counts: dict[int, int]) -> float:
    """Pearson's statistic of the first tokens against the verifier's softmax(l / T) (mask id
    excluded): its 8 likeliest non-stop tokens, one bin for the stop tokens, one for the rest
    (df = 9)."""
    with torch.no_grad():
        logits = pair.verifier.model(torch.tensor([prompt]))[0, -1].double()
    logits[pair.dream.spec.mask_token_id] = float("-inf")
    p = torch.softmax(logits / temperature, -1)
    stops = list(pair.verifier.spec.stop_token_ids)
    order = [t for t in p.argsort(descending=True).tolist() if t not in stops][:8]
    n = sum(counts.values())
    bins = [(counts.get(t, 0), float(p[t]) * n) for t in order]
    bins.append((counts.get("stop", 0), float(p[stops].sum()) * n))
    bins.append((n - sum(c for c, _ in bins), n - sum(e for _, e in bins)))
    return sum((c - e) ** 2 / e for c, e in bins if e > 0)


def test_speculative_sampling_keeps_the_verifier_distribution(monkeypatch):
    """Seeded chi-square on the first token (800 requests, T = 0.7): the engine's speculative
    sampling does not reject the verifier's law (p > 0.001: statistic < 27.9 at df = 9); an
    acceptance rule that keeps every draft does reject it."""
    pair = load_pair(APD[0][0])
    prompt = [7, 19, 23, 4, 11]
    good = _chi_square(pair, prompt, 0.7, _first_token_counts(pair, prompt, 0.7, 800))
    print("chi2 good", good)
    assert good < 27.9, good
    from dfastllm_ray.engine import hybrid

    def keep_all(draft, q, p, u_accept, u_next, lengths):
        acc = lengths.clone()
        return acc, draft.gather(1, (acc - 1).clamp(min=0)[:, None])[:, 0]
    monkeypatch.setattr(hybrid, "speculative_accept", keep_all)
    bad = _chi_square(pair, prompt, 0.7, _first_token_counts(pair, prompt, 0.7, 800))
    print("chi2 bad", bad)
    assert bad > 27.9, bad
