"""Every case of every reference fixture folder (see tests/reference_harness.py).

`DFASTLLM_REFERENCE_DIR=/path/to/reference pytest tests/test_reference.py` checks other
checkpoints in the same layout the same way. Test ids are `<folder>/<case name>`.
"""
from __future__ import annotations

import json
import shutil

import pytest

from reference_harness import DEFAULT_ROOT, all_cases, reference_root, run_case

CASES = all_cases()


def test_fixtures_found():
    """An empty or misnamed root must fail, not pass vacuously with zero cases."""
    assert CASES, f"no */manifest.json with cases under {reference_root()}"


@pytest.mark.parametrize("folder,name", CASES, ids=[f"{f.name}/{n}" for f, n in CASES])
def test_reference_case(folder, name):
    run_case(folder, name)


def test_unknown_kind_fails_and_the_root_comes_from_the_environment(tmp_path, monkeypatch):
    src = DEFAULT_ROOT / "llada-tiny"
    dst = tmp_path / "other-ckpt"
    shutil.copytree(src, dst)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["cases"] = [dict(manifest["cases"][0], name="mystery", kind="mystery_kind")]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("DFASTLLM_REFERENCE_DIR", str(tmp_path))
    assert all_cases() == [(dst, "mystery")]
    with pytest.raises(AssertionError, match="unknown case kind 'mystery_kind'"):
        run_case(dst, "mystery")
