"""`benchmarks/offline.py` on the 2-layer fixture, 2 requests: every field of the JSON is there,
the counts are the engine's (NFE, steps by kind, syncs), and the scripted mode's TPF is measured
(the threshold policy commits exactly K per forward)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import offline, sdar_offline  # noqa: E402
from benchmarks.step_probe import PHASES  # noqa: E402

TINY = str(ROOT / "tests" / "fixtures" / "reference" / "llada-tiny")
SMALL = ["--model", TINY, "--device", "cpu", "--batch", "2", "--prompt-len", "16", "--gen-len",
         "32", "--block-len", "16", "--no-progress"]
FIELDS = {"path", "batch", "prompt_len", "gen_len", "block_len", "tpf_source", "tokens", "seconds",
          "tokens_per_s", "nfe", "tpf", "steps", "ms_per_step", "peak_gb", "ttfb_ms", "latency_ms",
          "phases_ms_per_step", "ops_per_step", "by_kind"}
HEADER = {"model", "dtype", "device", "hardware", "torch", "threads", "commit", "command",
          "prompt_len", "gen_len", "block_len", "batch", "tpf_source", "phase_sync"}


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "r.json"
    offline.main([*SMALL, *extra, "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["header"]) == HEADER
    for r in data["results"]:
        assert set(r) == FIELDS, r["path"]
    return data


def _check_engine_row(r: dict, kinds: set[str]) -> None:
    assert r["peak_gb"] is None                                   # CPU: no per-mode peak
    assert set(r["ttfb_ms"]) == set(r["latency_ms"]) == {"p50", "p90", "p99"}
    assert r["ttfb_ms"]["p50"] <= r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert set(r["phases_ms_per_step"]) == set(PHASES)
    assert set(r["by_kind"]) == kinds
    assert sum(k["steps"] for k in r["by_kind"].values()) == r["steps"]
    assert r["ops_per_step"]["syncs"] == 0 and r["ops_per_step"]["kernels"] > 0
    assert 0 < r["ops_per_step"]["forward_kernels"] < r["ops_per_step"]["kernels"]


@pytest.mark.slow
def test_fixed_quota_reference_and_every_mode(tmp_path):
    data = _run(tmp_path, "--modes", "none", "dual")
    ref, none, dual = data["results"]
    assert ref["path"] == "reference" and ref["nfe"] == 32 and ref["by_kind"] is None
    for r in (none, dual):
        assert r["tokens"] == 64 and r["nfe"] == 32 and r["tpf"] == 1.0     # 1 token per step
    _check_engine_row(none, {"full"})
    _check_engine_row(dual, {"refresh", "cached"})
    assert dual["by_kind"]["refresh"]["steps"] == 2                 # one refresh per block


def test_scripted_tpf_is_measured_through_the_threshold_policy(tmp_path):
    data = _run(tmp_path, "--scripted-tpf", "4", "--modes", "dual")
    assert data["header"]["tpf_source"] == "scripted k=4, threshold 0.9"
    [dual] = data["results"]                                        # no reference for a script
    assert dual["tokens"] == 64 and dual["nfe"] == 8 and dual["tpf"] == 4.0
    _check_engine_row(dual, {"refresh", "cached"})
    assert dual["by_kind"]["cached"]["steps"] == 2 * 3              # 16 / 4 - 1 per block


def test_scripted_tpf_on_dream_commits_one_at_each_refresh_then_k(tmp_path):
    dream = str(ROOT / "tests" / "fixtures" / "reference" / "dream-tiny")
    data = _run(tmp_path, "--model", dream, "--scripted-tpf", "4", "--modes", "none", "dual")
    none, dual = data["results"]
    assert none["nfe"] == 8 and none["tpf"] == 4.0                  # 32 / 4, one block
    assert dual["nfe"] == 10 and dual["tpf"] == 3.2                 # per block: 1 + 4 + 4 + 4 + 3
    _check_engine_row(dual, {"refresh", "cached"})


def test_bad_flags_are_refused_with_the_flag_named(capsys):
    with pytest.raises(SystemExit):
        offline.parse_args(["--gen-len", "30", "--block-len", "16"])
    assert "--block-len 16 must divide --gen-len 30" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        offline.parse_args(["--scripted-tpf", "0"])
    assert "--scripted-tpf 0 is invalid" in capsys.readouterr().err


SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def test_gpu_suite_parses_and_its_commands_are_valid_offline_flags():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)
    out = subprocess.run(["bash", str(SUITE), "--dry-run"], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert len(out) == 8       # 2 shapes x (batch 1, batch 64), graphs / flex / incremental, SDAR
    sdar = sdar_offline.parse_args(shlex.split(out.pop())[1:])
    assert (sdar.random_weights, sdar.device, sdar.batch, sdar.skip_reference) == \
        ("sdar-4b", "cuda", 64, True)
    for i, line in enumerate(out):
        args = offline.parse_args(shlex.split(line)[1:])
        assert args.random_weights in ("llada-8b", "dream-7b")
        assert args.modes == (["none", "prefix", "dual"] if i < 4 else ["dual"])
        assert (args.batch, args.tokens_per_step, args.scripted_tpf) in ((1, 1, None), (64, 1, 4))
        assert args.json.startswith("benchmarks/results/gpu/")
    extra = [offline.parse_args(shlex.split(line)[1:]) for line in out[4:]]
    assert [a.cuda_graphs for a in extra] == [True, False, False]
    assert [a.attention_backend for a in extra] == ["sdpa", "flex", "sdpa"]
    assert [a.refresh for a in extra] == ["full", "full", "incremental"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_suite_fails_fast_without_cuda():
    run = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 1 and "no CUDA device" in run.stderr and not run.stdout
