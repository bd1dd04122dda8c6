"""The offline front doors with a verifier: `LLM(model, verifier=folder)` loads it with the
model's dtype and device, and `python -m dfastllm_ray.generate --verifier DIR --decoding
speculative` at temperature 0 prints the verifier's own greedy tokens (APD fixture pair)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dfastllm_ray import LLM
from dfastllm_ray.generate import main
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.sampling.ar_generate import ar_generate

PAIR = Path(__file__).resolve().parent / "fixtures" / "apd" / "apd-tiny"
PROMPT = [5, 6, 7, 8]


def test_llm_loads_the_verifier_like_the_model():
    llm = LLM(str(PAIR / "dream"), dtype="float32", device="cpu", verifier=str(PAIR / "verifier"))
    verifier = llm.engine.verifier
    assert verifier.spec.causal and verifier.dtype == torch.float32
    assert verifier.device == llm.engine.device


def test_cli_speculative_prints_the_verifier_greedy_tokens(capsys):
    rc = main(["--model", str(PAIR / "dream"), "--verifier", str(PAIR / "verifier"),
               "--decoding", "speculative", "--draft-tokens", "3", "--max-tokens", "8",
               "--prompt-ids", ",".join(map(str, PROMPT)), "--device", "cpu", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    verifier = load_model(PAIR / "verifier", dtype="float32", device="cpu")
    greedy = ar_generate(verifier.model, verifier.spec, torch.tensor([PROMPT]), 8).tokens
    stops = set(verifier.spec.stop_token_ids)
    assert record["token_ids"] == [t for t in greedy if t not in stops]
    assert record["verifier_forwards"] == record["nfe"] >= 1


def test_cli_hybrid_without_a_verifier_is_a_usage_error(capsys):
    assert main(["--decoding", "apd", "--prompt", "hi"]) == 2
    assert "--decoding apd needs --verifier DIR" in capsys.readouterr().err
