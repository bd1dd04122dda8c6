"""The engine equals the official references: every deterministic fixture case, one request per
prompt row, in the cache mode the case names (none = ML-GSAI / hub / Fast-dLLM `generate`;
prefix / dual = Fast-dLLM's caches). Token-identical, and the same NFE for batch-1 cases."""
from __future__ import annotations

import pytest

from engine_models import (case_mode, case_params, engine, engine_cases, expected_tokens, fixture,
                           run_all, tiny)

CASES = [("llada-tiny", c) for c in engine_cases("llada-tiny")] + \
        [("dream-tiny", c) for c in engine_cases("dream-tiny")]


@pytest.mark.parametrize("model,case_name", CASES, ids=[c for _, c in CASES])
def test_engine_equals_reference(model, case_name):
    manifest, T = fixture(model)
    case = next(c for c in manifest["cases"] if c["name"] == case_name)
    kw, spec = case["kwargs"], tiny(model).spec
    prompt = T[kw["prompt"]]
    if "rows" in kw:
        prompt = prompt[kw["rows"][0]:kw["rows"][1]]
    ref = T[case["outputs"]["sequences"]]
    eng = engine(model, case_mode(case))
    params = case_params(case)
    finals = run_all(eng, {str(r): (prompt[r].tolist(), params) for r in range(prompt.shape[0])})
    for r in range(prompt.shape[0]):
        want = expected_tokens(ref[r].tolist(), prompt.shape[1], spec.stop_token_ids,
                               spec.mask_token_id)
        assert finals[str(r)].token_ids == want, f"row {r}"
    if prompt.shape[0] == 1:
        assert finals["0"].nfe == case["nfe"]
    if eng.pool is not None:
        assert eng.scheduler.allocator.num_free_pages == eng.pool.num_pages
