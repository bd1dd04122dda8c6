"""Block diffusion (SDAR) in the engine == the reference loop, batched, with its refusals.

The engine draws sampled tokens from its counter RNG (rng.py), so token-for-token equality with
the reference holds where the draw is deterministic: `top_k=1`, SDAR's official greedy form
(every draw is the argmax, confidence 1.0). Those runs are compared with `block_diffusion_generate`
for every strategy, block and step count and all three fixture prompts (prompt tail of 1, 0 and
1 / 5 tokens), canvas and NFE, alone and batched, in both `block_store` orders (separate: the
official forwards; fused: the same minus the storing ones); the official fixtures' greedy cases
are matched as recorded. The reference runs with `overwrite_committed=False` (k clipped to the masks left:
the engine never rewrites a committed token); with k within the masks the two rules agree.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.sampling.sdar_generate import BlockDiffusionParams, block_diffusion_generate

FOLDER = Path(__file__).parents[1] / "fixtures" / "sdar" / "sdar-tiny"
PROMPTS = ("prompt5", "prompt8", "prompt13")
STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic")
SHAPES = ((4, 4), (4, 2), (8, 4), (8, 2))        # (block, denoising steps per block)
GEN = 16


@lru_cache(maxsize=None)
def fixture():
    return load_file(str(FOLDER / "fixtures.safetensors")), load_model(FOLDER, "float32", "cpu")


def engine(**config) -> Engine:
    _, loaded = fixture()
    return Engine(loaded, EngineConfig(**{"max_num_seqs": 16, "exact_ties": True,
                                          "max_model_len": 128, **config}))


def reference(prompt: str, strategy: str, block: int, steps: int, gen: int = GEN):
    T, loaded = fixture()
    p = BlockDiffusionParams(gen_length=gen, block_length=block, denoising_steps=steps, top_k=1,
                             remasking_strategy=strategy, overwrite_committed=False)
    return block_diffusion_generate(loaded.model, T[prompt], p, loaded.spec)


def params(prompt: str, strategy: str, block: int, steps: int, **kw) -> SamplingParams:
    """The engine's knobs for the reference call: `steps` is the whole generation's budget."""
    T, _ = fixture()
    plen = T[prompt].shape[1]
    blocks = -(-(plen + GEN) // block) - plen // block
    return SamplingParams(**{"max_tokens": GEN, "block_length": block, "steps": steps * blocks,
                             "top_k": 1, "temperature": 1.0, "remasking_strategy": strategy,
                             **kw})


def run(eng: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (ids, p) in requests.items():
        eng.add_request(rid, ids, p)
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return done


CASES = [(p, s, b, k) for p in PROMPTS for s in STRATEGIES for b, k in SHAPES]


def case_id(c) -> str:
    return f"{c[0]}-{c[1]}-b{c[2]}-s{c[3]}"


def expected_nfe(ref, block_store: str) -> int:
    """separate: the official forwards; fused: without the storing ones (each rides on the next
    block's first forward, and the last block's is never needed)."""
    return ref.nfe if block_store == "separate" else ref.nfe - ref.store_forwards


@pytest.mark.parametrize("block_store", ["separate", "fused"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_engine_equals_reference_greedy(case, block_store):
    prompt, strategy, block, steps = case
    T, _ = fixture()
    ref = reference(*case)
    plen = T[prompt].shape[1]
    out = run(engine(block_store=block_store), {"r": (T[prompt][0].tolist(), params(*case))})["r"]
    # the engine returns the canvas after the prompt (the reference's rounding included)
    assert out.token_ids[:GEN] == ref.x[0, plen:plen + GEN].tolist()
    assert out.nfe == expected_nfe(ref, block_store)
    assert out.finish_reason == "length"


@pytest.mark.parametrize("block_store", ["separate", "fused"])
def test_batch_equals_single_and_reference(block_store):
    """Every case at once, strategies and blocks mixed in the same steps."""
    T, _ = fixture()
    reqs = {case_id(c): (T[c[0]][0].tolist(), params(*c)) for c in CASES}
    together = run(engine(max_num_seqs=len(reqs), block_store=block_store), reqs)
    for c in CASES:
        ref = reference(*c)
        plen = T[c[0]].shape[1]
        got = together[case_id(c)]
        assert got.token_ids[:GEN] == ref.x[0, plen:plen + GEN].tolist(), case_id(c)
        assert got.nfe == expected_nfe(ref, block_store), case_id(c)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_official_greedy_fixture_case_matches(prompt):
    """The fixtures' `top_k=1` cases (gen_length 17: a canvas rounded past max_tokens)."""
    T, _ = fixture()
    name = f"{prompt.replace('prompt', 'p')}.greedy_topk1.b4.s4"
    case = next(c for c in __import__("json").loads((FOLDER / "manifest.json").read_text())["cases"]
                if c["name"] == name)
    k = case["kwargs"]
    plen, gen = T[prompt].shape[1], k["gen_length"]
    blocks = -(-(plen + gen) // 4) - plen // 4
    p = SamplingParams(max_tokens=gen, block_length=4, steps=4 * blocks, top_k=1, temperature=1.0,
                       remasking_strategy=k["remasking_strategy"],
                       threshold=k["confidence_threshold"])
    out = run(engine(block_store="separate"), {"r": (T[prompt][0].tolist(), p)})["r"]
    want = T[case["x"]][0, plen:]
    assert out.token_ids == want.tolist()              # the whole rounded canvas
    assert out.nfe == case["nfe"]


def test_sampled_requests_are_seeded_and_batch_invariant():
    T, _ = fixture()
    ids = T["prompt13"][0].tolist()
    p = SamplingParams(max_tokens=GEN, block_length=4, temperature=0.7, top_p=0.9, seed=7,
                       remasking_strategy="low_confidence_dynamic")
    alone = run(engine(), {"a": (ids, p)})["a"].token_ids
    other = SamplingParams(max_tokens=GEN, block_length=4, temperature=1.0, top_k=5, seed=1,
                           remasking_strategy="low_confidence_static")
    both = run(engine(), {"b": (T["prompt5"][0].tolist(), other), "a": (ids, p)})
    assert both["a"].token_ids == alone
    reseeded = run(engine(), {"a": (ids, SamplingParams(**{**p.__dict__, "seed": 8}))})["a"]
    assert reseeded.token_ids != alone
    assert 510 not in alone                                  # every position decoded


def test_defaults_come_from_the_checkpoint():
    """block_length = config block_size (4), the official default strategy and threshold,
    one token per step; the reported output stops at max_tokens through output_limit."""
    eng = engine()
    p = eng.resolve_params(SamplingParams(max_tokens=10), prompt_len=5)
    assert (p.block_length, p.remasking_strategy, p.threshold) == (4, "low_confidence_dynamic",
                                                                  0.85)
    # blocks at 4..8, 8..12, 12..16: canvas 16, 11 positions after the prompt, 10 returned
    assert (p.max_tokens, p.output_limit, p.steps) == (11, 10, 12)
    assert eng.resolve_params(SamplingParams(max_tokens=10, steps=7), 5).steps == 6   # 2 / block
    assert eng.resolve_params(SamplingParams(max_tokens=10, steps=1), 5).steps == 3   # >= 1
    with pytest.raises(ValueError, match=r"steps=13 is invalid: at most 12 .*3 blocks of 4"):
        eng.resolve_params(SamplingParams(max_tokens=10, steps=13), 5)


def test_a_stop_token_ends_the_request_after_its_block():
    T, loaded = fixture()
    ids = T["prompt8"][0].tolist()
    first = run(engine(), {"r": (ids, params("prompt8", "sequential", 4, 4))})["r"].token_ids
    eng = engine()
    eng.scheduler.stop_token_ids = frozenset({first[5]})      # a token of the second block
    out = run(eng, {"r": (ids, params("prompt8", "sequential", 4, 4))})["r"]
    assert out.finish_reason == "stop"
    assert out.token_ids == first[:first.index(first[5])]
    # fused: prompt prefill and block 0's store ride on forwards; block 1 stops the request
    # at its last commit (its block-2 forward never runs)
    assert out.nfe == 2 * 4


def test_abort_mid_block_frees_every_page():
    T, _ = fixture()
    eng = engine()
    free = eng.scheduler.allocator.num_free_pages
    eng.add_request("r", T["prompt13"][0].tolist(), params("prompt13", "sequential", 4, 4))
    for _ in range(4):
        eng.step()
    assert eng.scheduler.allocator.num_free_pages < free
    eng.abort("r")
    assert eng.scheduler.allocator.num_free_pages == free and not eng.has_unfinished()


@pytest.mark.parametrize("config, match", [
    ({"kv_cache_mode": "none"}, "kv_cache_mode='none' is invalid.*block-diffusion"),
    ({"attention_backend": "flex"}, "attention_backend='flex' is invalid"),
    ({"cuda_graphs": True}, "cuda_graphs=True is invalid"),
])
def test_engine_settings_it_cannot_run_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        engine(**config)


@pytest.mark.parametrize("knobs, match", [
    ({"remasking": "random"}, "remasking='random' is a LLaDA / Dream knob"),
    ({"alg": "entropy"}, "alg='entropy' is a LLaDA / Dream knob"),
    ({"factor": 1.0}, "factor=1.0 is a LLaDA / Dream knob"),
    ({"kv_cache_mode": "prefix"}, "kv_cache_mode='prefix' is invalid for a block-diffusion"),
    ({"speed": "fast"}, "speed='fast' is invalid for a block-diffusion"),
    ({"decoding": "apd"}, "decoding='apd' is invalid for a block-diffusion"),
    ({"threshold": 0.5, "remasking_strategy": "sequential"}, "threshold=0.5 applies to"),
    ({"max_tokens": 124}, "max_tokens=124 is invalid: .*whole blocks of 4.*at most 123"),
])
def test_knobs_it_does_not_use_are_refused(knobs, match):
    with pytest.raises(ValueError, match=match):
        engine().resolve_params(SamplingParams(**knobs), prompt_len=5)


def test_mask_token_in_the_prompt_is_refused():
    with pytest.raises(ValueError, match="holds the mask token"):
        engine().add_request("r", [1, 510, 2], SamplingParams(max_tokens=8))


@pytest.mark.parametrize("block_store", ["separate", "fused"])
def test_prefix_cache_shares_whole_prompt_blocks(block_store):
    """Two requests with one 13-token prompt, pages of 8 (a multiple of B = 4): the second finds
    the first page (positions 0-7, inside the prompt's whole blocks 0-11) cached, decodes the
    same tokens, and a page size that cuts blocks shares nothing."""
    T, _ = fixture()
    ids = T["prompt13"][0].tolist()
    p = params("prompt13", "low_confidence_static", 4, 4)
    alone = run(engine(block_store=block_store), {"a": (ids, p)})["a"]
    eng = engine(block_store=block_store, enable_prefix_caching=True, page_size=8)
    first = run(eng, {"a": (ids, p)})["a"]
    second = run(eng, {"b": (ids, p)})["b"]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 8
    assert first.token_ids == second.token_ids == alone.token_ids
    assert second.nfe == first.nfe
    odd = engine(block_store=block_store, enable_prefix_caching=True, page_size=6)
    run(odd, {"a": (ids, p)})
    assert run(odd, {"b": (ids, p)})["b"].num_cached_tokens == 0


@pytest.mark.parametrize("block_store", ["separate", "fused"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("knobs", [dict(top_k=1, temperature=1.0),
                                   dict(temperature=0.7, top_p=0.9, top_k=5, seed=3)],
                         ids=["greedy", "sampled"])
def test_step_has_no_sync_and_sampling_ops_do_not_grow_with_batch(block_store, strategy, knobs,
                                                                   monkeypatch):
    """The hot path's rules hold for block diffusion: no data-dependent op in a step, and one
    sampler op count per kind of group whatever the batch: at most 60 (tests/engine/
    test_step_ops.py's bound) for the greedy form; a draw after both filters takes 66 (the
    counter RNG's ~20 integer ops and the filters' shared sort); a group mixing all three
    strategies, 74."""
    from test_step_ops import _sampling_ops

    from dfastllm_ray.sampling import batch_propose
    monkeypatch.setattr(batch_propose, "ARGMAX_TILED_MIN", float("inf"))
    T, _ = fixture()
    counts = {}
    for batch in (1, 16, 64):
        eng = engine(max_num_seqs=batch, block_store=block_store, exact_ties=False)
        for i in range(batch):
            prompt = T[PROMPTS[i % 3]][0].tolist()
            eng.add_request(str(i), prompt, SamplingParams(max_tokens=GEN,
                                                           remasking_strategy=strategy, **knobs))
        ops, syncs = _sampling_ops(eng, 4, monkeypatch)
        assert syncs == {}, f"batch {batch}: data-dependent ops in a step: {syncs}"
        counts[batch] = ops
    bound = 70 if "seed" in knobs else 60
    for chain, ops in counts[64].items():
        assert len(ops) == 1 and max(ops) <= bound, counts
        assert all(counts[b].get(chain, ops) == ops for b in (1, 16)), counts
    assert set(counts[64]) & set(counts[16]), counts


@pytest.mark.parametrize("top_k_first", [True, False], ids=["sdar", "dream"])
def test_one_sort_filters_equal_the_two_official_filters(top_k_first):
    """Both filters on: `_top_k_and_p` (one sort) == the hub's `top_k_logits` and
    `top_p_logits` applied one after the other in the family's order (SDAR: k then p)."""
    from dfastllm_ray.sampling.batch_propose import _top_k_and_p
    from dfastllm_ray.sampling.dream import top_k_logits, top_p_logits
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(3, 5, 64, generator=g) * 3
    top_k, top_p = torch.tensor([5, 0, 40]), torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64)
    got = _top_k_and_p(lg, top_k, top_p, top_k_first)
    for r in range(3):
        want = lg[r]
        steps = [lambda x: top_k_logits(x, int(top_k[r])) if top_k[r] else x,
                 lambda x: top_p_logits(x, float(top_p[r])) if top_p[r] < 1 else x]
        for f in (steps if top_k_first else steps[::-1]):
            want = f(want)
        assert torch.equal(got[r], want), r


@pytest.mark.parametrize("block_store", ["separate", "fused"])
def test_chunked_prefill_under_a_small_token_budget(block_store):
    """A 13-token prompt under a budget of 8 tokens per step: the prompt blocks are stored in
    chunks of whole blocks, and the tokens are those of an unbounded budget."""
    T, _ = fixture()
    ids = T["prompt13"][0].tolist()
    p = params("prompt13", "low_confidence_dynamic", 4, 4)
    want = run(engine(block_store=block_store), {"a": (ids, p)})["a"].token_ids
    eng = engine(block_store=block_store, chunked_refresh=True, max_num_batched_tokens=8)
    assert run(eng, {"a": (ids, p)})["a"].token_ids == want
    with pytest.raises(ValueError, match="max_num_batched_tokens=7"):
        engine(block_store=block_store, chunked_refresh=True,
               max_num_batched_tokens=7).add_request("b", ids, p)
