"""The engine equals the official references: every deterministic fixture case, one request per
prompt row, in the cache mode the case names (none = ML-GSAI / hub / Fast-dLLM `generate`;
prefix / dual = Fast-dLLM's caches). Token-identical, the same masks left in the output, the
same NFE for batch-1 cases, and per-request NFE and tokens independent of the batch size.

Each case runs on the fast path (float32 batched sampler, ties by position) and on the exact
path (float64 confidences, ties as the official torch.topk). EXACT_TIES_ONLY lists the cases
whose official output depends on torch.topk's choice among exactly equal confidences. The
deterministic cases the engine does not run are listed with their reason (engine_models.REFUSED)
and their refusal is tested."""
from __future__ import annotations

import pytest

from dfastllm_ray.sampling.params import SamplingParams
from engine_models import (REFUSED, case_mode, case_params, deterministic_cases, engine,
                           engine_cases, expected_span, fixture, refusal, run_all, tiny,
                           unpadded_prompts)

MODELS = ("llada-tiny", "dream-tiny")
CASES = [(m, c) for m in MODELS for c in engine_cases(m)]
# top_k leaves a single token at many positions: their margins are all exactly 1.0
EXACT_TIES_ONLY = {"dream.topk_margin.s32.topp0.9.topk20"}
PATHS = {"fast": {}, "exact": {"sampler_dtype": "float64", "exact_ties": True}}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("model,case_name", CASES, ids=[c for _, c in CASES])
def test_engine_equals_reference(model, case_name, path):
    if path == "fast" and case_name in EXACT_TIES_ONLY:
        pytest.skip("exact ties: covered by the exact path")
    manifest, T = fixture(model)
    case = next(c for c in manifest["cases"] if c["name"] == case_name)
    spec = tiny(model).spec
    width = T[case["kwargs"]["prompt"]].shape[1]
    ref = T[case["outputs"]["sequences"]]
    prompts = unpadded_prompts(case, T)
    eng = engine(model, case_mode(case), **PATHS[path])
    params = case_params(case)
    finals = run_all(eng, {str(r): (p, params) for r, p in enumerate(prompts)})
    for r in range(len(prompts)):
        span = expected_span(ref[r].tolist(), width, spec.stop_token_ids)
        want = [t for t in span if t != spec.mask_token_id]
        assert finals[str(r)].token_ids == want, f"row {r}"
        assert finals[str(r)].num_masks_left == span.count(spec.mask_token_id), f"row {r} masks"
        assert finals[str(r)].nfe <= case["nfe"]
    if len(prompts) == 1:
        assert finals["0"].nfe == case["nfe"]
    else:                       # NFE and tokens of each row do not depend on the batch size
        for r, p in enumerate(prompts):
            alone = run_all(engine(model, case_mode(case), **PATHS[path]), {"x": (p, params)})
            assert (alone["x"].token_ids, alone["x"].nfe) == (finals[str(r)].token_ids,
                                                              finals[str(r)].nfe)
    if eng.pool is not None:
        assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages


@pytest.mark.parametrize("model", MODELS)
def test_every_deterministic_case_is_run_or_refused_with_a_reason(model):
    for case in deterministic_cases(model):
        reason = refusal(case)
        assert (case["name"] in engine_cases(model)) != (reason is not None), case["name"]
        assert reason is None or reason in REFUSED


def test_guidance_is_refused_with_a_clear_error():
    eng = engine("llada-tiny", "none")
    with pytest.raises(ValueError, match="cfg_scale"):
        eng.add_request("g", [5, 6, 7], SamplingParams(max_tokens=8, cfg_scale=1.0))
