"""`benchmarks/offline.py --decoding diffusion apd speculative` on the APD fixture's tiny pair:
one row per decoding, hybrid rows carry the verifier's forwards (one per drafter forward and
request), and a hybrid decoding without a verifier is refused naming the flags."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import offline  # noqa: E402

PAIR = ROOT / "tests" / "fixtures" / "apd" / "apd-tiny"
ARGS = ["--model", str(PAIR / "dream"), "--verifier", str(PAIR / "verifier"), "--device", "cpu",
        "--batch", "2", "--prompt-len", "8", "--gen-len", "16", "--block-len", "16",
        "--modes", "dual", "--skip-reference", "--no-progress", "--no-count-ops",
        "--decoding", "diffusion", "apd", "speculative", "--max-lookahead", "8"]


def test_one_row_per_decoding_with_the_verifier_counts(tmp_path):
    out = tmp_path / "r.json"
    offline.main([*ARGS, "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {r["path"]: r for r in data["results"]}
    assert list(rows) == ["dual", "dual/apd", "dual/speculative"]
    assert "verifier_forwards" not in rows["dual"]
    assert data["header"]["verifier"] == str(PAIR / "verifier")
    for name in ("dual/apd", "dual/speculative"):
        r = rows[name]
        # each hybrid step is one drafter and one verifier forward of every running request
        assert r["verifier_forwards"] == r["nfe"] >= 1
        assert r["verifier_forwards_per_token"] == pytest.approx(
            r["verifier_forwards"] * r["batch"] / r["tokens"])
        assert set(r["by_kind"]) == {"hybrid"}
    assert rows["dual/apd"]["tpf_source"] == "apd R=0.7 W=None M=8"
    assert rows["dual/speculative"]["tpf_source"] == "speculative draft_tokens=4"


def test_hybrid_decoding_without_a_verifier_is_refused(capsys):
    with pytest.raises(SystemExit):
        offline.parse_args(["--decoding", "apd"])
    assert "--decoding apd needs a verifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        offline.parse_args(["--decoding", "speculative", "--verifier", "x",
                            "--verifier-random-weights", "qwen2.5-0.5b"])
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):               # a causal shape is no drafter
        offline.parse_args(["--random-weights", "qwen2.5-0.5b"])


def test_the_gpu_command_runs_on_shrunk_published_shapes(monkeypatch, tmp_path):
    """`--random-weights dream-7b --verifier-random-weights qwen2.5-0.5b` with every shape cut to
    2 layers of width 64 (vocabularies kept: Dream's 152064 >= Qwen2.5's 151936)."""
    import dataclasses

    from dfastllm_ray.models import shapes
    for name in ("dream-7b", "qwen2.5-0.5b"):
        small = dataclasses.replace(shapes.KNOWN_SHAPES[name], num_layers=2, hidden_size=64,
                                    num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)
        monkeypatch.setitem(shapes.KNOWN_SHAPES, name, small)
    out = tmp_path / "r.json"
    offline.main(["--random-weights", "dream-7b", "--verifier-random-weights", "qwen2.5-0.5b",
                  "--decoding", "diffusion", "apd", "speculative", "--modes", "dual",
                  "--device", "cpu", "--batch", "2", "--prompt-len", "8", "--gen-len", "8",
                  "--block-len", "8", "--skip-reference", "--no-progress", "--no-count-ops",
                  "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["header"]["verifier"] == "random-qwen2.5-0.5b"
    assert [r["path"] for r in data["results"]] == ["dual", "dual/apd", "dual/speculative"]
    assert all(r["tokens"] > 0 for r in data["results"])
