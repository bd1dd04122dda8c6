"""Every case of every APD fixture pair (see tests/reference_apd.py).

`DFASTLLM_APD_REFERENCE_DIR=/path/to/apd pytest tests/test_reference_apd.py` checks other pairs
in the same layout the same way. Test ids are `<pair>/<case name>`.
"""
from __future__ import annotations

import json
import shutil

import pytest

from reference_apd import DEFAULT_ROOT, all_cases, apd_root, run_case

CASES = all_cases()


def test_fixtures_found():
    """An empty or misnamed root must fail, not pass vacuously with zero cases."""
    assert CASES, f"no */manifest.json with cases under {apd_root()}"


@pytest.mark.parametrize("folder,name", CASES, ids=[f"{f.name}/{n}" for f, n in CASES])
def test_apd_case(folder, name):
    run_case(folder, name)


def _copy_pair(tmp_path, cases):
    src = next(p.parent for p in sorted(DEFAULT_ROOT.glob("*/manifest.json")))
    dst = tmp_path / "other-pair"
    shutil.copytree(src, dst)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["cases"] = cases(manifest["cases"])
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_unknown_kind_fails_and_the_root_comes_from_the_environment(tmp_path, monkeypatch):
    dst = _copy_pair(tmp_path, lambda cs: [dict(cs[1], name="mystery", kind="mystery_kind")])
    monkeypatch.setenv("DFASTLLM_APD_REFERENCE_DIR", str(tmp_path))
    assert all_cases() == [(dst, "mystery")]
    with pytest.raises(AssertionError, match="unknown case kind 'mystery_kind'"):
        run_case(dst, "mystery")


def test_unknown_call_argument_and_a_wrong_count_fail(tmp_path):
    def edit(cs):
        apd = next(c for c in cs if c["kind"] == "apd_diffusion_generate")
        odd = dict(apd, name="odd", kwargs=dict(apd["kwargs"], cfg_scale=0.5))
        wrong = dict(apd, name="wrong", nfe_diffusion=apd["nfe_diffusion"] + 1)
        return [odd, wrong]
    dst = _copy_pair(tmp_path, edit)
    with pytest.raises(AssertionError, match=r"call arguments \['cfg_scale'\] have no mapping"):
        run_case(dst, "odd")
    with pytest.raises(AssertionError, match="dLLM forwards"):
        run_case(dst, "wrong")


def test_empty_root_has_no_cases(tmp_path, monkeypatch):
    monkeypatch.setenv("DFASTLLM_APD_REFERENCE_DIR", str(tmp_path))
    assert all_cases() == []          # test_fixtures_found fails on such a root
