"""SDAR: our model and `block_diffusion_generate` == the official JetAstra/SDAR code.

Fixtures: tests/fixtures/sdar/sdar-tiny (README there; REFERENCE_ALGORITHMS.md section 9),
loaded through the project's loader, float32 on CPU. Every manifest case runs by its kind; an
unknown kind, or a call argument `BlockDiffusionParams` does not know, fails.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.models.block_kv import ReadOnlyKV
from dfastllm_ray.models.causal_kv import CausalKV
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.models.sdar import SDARForCausalLM, block_causal_mask
from dfastllm_ray.sampling import sdar_generate as G
from dfastllm_ray.sampling.sdar_generate import BlockDiffusionParams, block_diffusion_generate
from reference_harness import assert_close_logits

FOLDER = Path(__file__).parent / "fixtures" / "sdar" / "sdar-tiny"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
GENERATE = [c for c in MANIFEST["cases"] if c["kind"] == "sdar_block_diffusion_generate"]


@lru_cache(maxsize=None)
def fixture():
    return load_file(str(FOLDER / "fixtures.safetensors")), load_model(FOLDER, "float32", "cpu")


def test_manifest_holds_only_known_kinds_and_all_cases():
    kinds = [c["kind"] for c in MANIFEST["cases"]]
    assert set(kinds) == {"sdar_forward", "sdar_block_diffusion_generate"}
    assert len(kinds) == 46 and kinds.count("sdar_forward") == 1


def test_loader_builds_sdar_from_its_config():
    _, loaded = fixture()
    assert isinstance(loaded.model, SDARForCausalLM)
    s = loaded.spec
    assert (s.arch, s.block_size, s.mask_token_id, s.eos_token_id) == ("sdar", 4, 510, 501)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.qkv_bias, s.causal) == (4, 2, 16, False,
                                                                               False)


def test_block_causal_full_forward_matches_official_logits():
    T, loaded = fixture()
    ids = T["fwd.input_ids"]
    pos = torch.arange(ids.shape[1])[None]
    assert torch.equal(block_causal_mask(pos, pos, 4)[:, 0], T["fwd.attention_mask"].bool())
    with torch.no_grad():
        built = loaded.model(ids)
        given = loaded.model(ids, attn_bias=T["fwd.attention_mask"].bool()[:, None])
    assert_close_logits(built, T["fwd.logits_full"], "fwd.logits_full")
    assert torch.equal(built, given)


def test_cached_block_forward_matches_official_logits_and_stores_nothing():
    T, loaded = fixture()
    ids = T["fwd.input_ids"]
    kv = CausalKV()
    with torch.no_grad():
        loaded.model(ids[:, :8], kv=kv)                      # store_kv=True
        assert kv.length == 8
        block = loaded.model(ids[:, 8:12], kv=ReadOnlyKV(kv))  # store_kv=False
        full = loaded.model(ids)
    assert kv.length == 8
    assert_close_logits(block, T["fwd.logits_cached_block"], "fwd.logits_cached_block")
    # cached == uncached: the last block's rows of the block-causal full forward
    assert_close_logits(block, full[:, 8:12], "cached block vs full forward")


def run_case(case: dict, generator: torch.Generator | None) -> G.BlockDiffusionOutput:
    T, loaded = fixture()
    params = BlockDiffusionParams(**case["kwargs"])
    return block_diffusion_generate(loaded.model, T[case["prompt"]], params, loaded.spec,
                                    generator)


@pytest.mark.parametrize("case", GENERATE, ids=[c["name"] for c in GENERATE])
def test_generate_matches_official_canvas_and_forwards(case):
    T, _ = fixture()
    out = run_case(case, torch.Generator().manual_seed(case["seed"]))
    assert torch.equal(out.x, T[case["x"]])
    assert out.nfe == case["nfe"]
    assert out.store_forwards == case["store_kv_forwards"]
    assert out.forward_lengths == case["forward_lengths"]


def test_global_rng_reproduces_the_manifest_call_as_written():
    """The manifest calls `torch.manual_seed(s)` then the loop with no generator."""
    T, _ = fixture()
    case = GENERATE[0]
    torch.manual_seed(case["seed"])
    assert torch.equal(run_case(case, None).x, T[case["x"]])


def test_the_topk_quirk_is_exercised_by_the_matched_cases(monkeypatch):
    """k > masks left: top-k also commits positions already holding a token. The fixtures hit
    it, so the exact matches above cover it; count the cases where it fires."""
    fired: set[str] = set()
    current = {"name": ""}
    for name, select in list(G.SELECT.items()):
        def spy(mask, conf, k, thr, select=select):
            out = select(mask, conf, k, thr)
            if bool((out & ~mask).any()):
                fired.add(current["name"])
            return out
        monkeypatch.setitem(G.SELECT, name, spy)
    for case in GENERATE:
        if case["kwargs"]["denoising_steps"] == 2 or case["kwargs"]["block_length"] == 8:
            current["name"] = case["name"]
            run_case(case, torch.Generator().manual_seed(case["seed"]))
    assert len(fired) >= 5, sorted(fired)


@pytest.mark.parametrize("case", [c for c in GENERATE if "stop_eos" in c["name"]],
                         ids=lambda c: c["name"])
def test_a_stop_id_ends_after_its_block_and_the_rest_equals_the_unstopped_run(case):
    """The fixtures' EOS never comes up, so stop on a token the official run drew: the draws up
    to the stop are the same, so the canvas is the official one up to the end of the block that
    holds it, then masks; one storing forward per decoded block."""
    T, loaded = fixture()
    want, plen = T[case["x"]], T[case["prompt"]].shape[1]
    b = case["kwargs"]["block_length"]
    stop = int(want[0, plen])                                 # the first generated token
    end = (plen // b + 1) * b                                # end of the first decoded block
    assert end < want.shape[1], "the chosen stop must leave blocks to skip"
    params = BlockDiffusionParams(**dict(case["kwargs"], stopping_criteria_idx=[stop]))
    out = block_diffusion_generate(loaded.model, T[case["prompt"]], params, loaded.spec,
                                   torch.Generator().manual_seed(case["seed"]))
    assert torch.equal(out.x[:, :end], want[:, :end])
    assert out.x[0, end:].eq(loaded.spec.mask_token_id).all()
    assert out.store_forwards == int(plen >= b) + end // b - plen // b
    assert out.forward_lengths == case["forward_lengths"][:out.nfe] and out.nfe < case["nfe"]


def test_entropy_bounded_is_refused():
    with pytest.raises(ValueError, match="entropy_bounded.*UnboundLocalError"):
        BlockDiffusionParams(remasking_strategy="entropy_bounded")
    with pytest.raises(ValueError, match="remasking_strategy='random' is invalid"):
        BlockDiffusionParams(remasking_strategy="random")


def test_temperature_zero_is_refused_and_top_k_one_is_greedy():
    with pytest.raises(ValueError, match="temperature=0.*top_k=1 is the greedy form"):
        BlockDiffusionParams(temperature=0.0)
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    tokens, probs = G.sample_with_temperature_topk_topp(logits, 1.0, 1, 1.0,
                                                        torch.Generator().manual_seed(1))
    assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(probs, torch.ones(3))


def test_unknown_call_argument_fails():
    with pytest.raises(TypeError, match="eb_threshold"):
        BlockDiffusionParams(**dict(GENERATE[0]["kwargs"], eb_threshold=0.35))


def test_engine_serves_it_with_a_kv_cache_only():
    """The engine decodes SDAR against stored blocks (tests/engine/test_engine_sdar.py); without
    a KV pool it refuses by name."""
    from dfastllm_ray.engine.config import EngineConfig
    _, loaded = fixture()
    with pytest.raises(ValueError, match=r"kv_cache_mode='none' is invalid.*block-diffusion"):
        Engine(loaded, EngineConfig(kv_cache_mode="none"))
