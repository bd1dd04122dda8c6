"""`benchmarks/hybrid_quality.py`: the rows on a tiny pair (the shipped tiny LLaDA + a random
tiny Qwen2 over its tokenizer), speculative == AR greedy on every prompt, and `fit_vocabulary`
cutting a verifier's extra ids exactly (logits of the shared ids unchanged) or refusing a pair
whose tokenizers differ."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "serve"))
from benchmarks import hybrid_quality  # noqa: E402
from tiny_pair import DRAFTER, random_verifier  # noqa: E402

from dfastllm_ray.models.loader import load_model  # noqa: E402


def test_rows_and_the_lossless_check(tmp_path):
    verifier = random_verifier(tmp_path / "v")
    out = tmp_path / "q"
    assert hybrid_quality.main(["--verifier", str(verifier), "--per-task", "1", "--apd", "0.7:4",
                                "--draft-tokens", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["drafter 1 token/step", "apd R=0.7 M=4", "speculative k=2",
                     "ar-greedy (verifier alone)"]
    assert data["speculative_equals_ar"] is True
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["drafter 1 token/step"]["verifier_forwards"] == 0
    assert rows["speculative k=2"]["verifier_forwards"] == rows["speculative k=2"][
        "drafter_forwards"] > 0


def grown_verifier(tmp_path: Path, extra: list[str]) -> Path:
    """A random verifier with 4 more ids than the drafter: its tokenizer is the drafter's plus
    `extra` special tokens (ids 108..111)."""
    from transformers import AutoTokenizer
    folder = random_verifier(tmp_path / "grown")
    cfg = json.loads((folder / "config.json").read_text())
    drafter_vocab = json.loads((DRAFTER / "config.json").read_text())["vocab_size"]
    cfg["vocab_size"] = drafter_vocab + len(extra)
    (folder / "config.json").write_text(json.dumps(cfg))
    random_verifier_weights(folder, cfg)
    tok = AutoTokenizer.from_pretrained(DRAFTER)
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.save_pretrained(folder)
    return folder


def random_verifier_weights(folder: Path, cfg: dict) -> None:
    from safetensors.torch import save_file

    from dfastllm_ray.models.qwen2 import Qwen2ForCausalLM, spec_from_config
    spec, tied = spec_from_config(cfg, {})
    torch.manual_seed(0)
    net = Qwen2ForCausalLM(spec, tied)
    state = {k: (torch.randn(v.shape) * 0.02).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def test_fit_vocabulary_cuts_exactly(tmp_path):
    folder = grown_verifier(tmp_path, ["<|beginoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"])
    drafter = load_model(DRAFTER, dtype="float32", device="cpu")
    verifier = load_model(folder, dtype="float32", device="cpu")
    assert verifier.spec.vocab_size == drafter.spec.vocab_size + 4
    ids = torch.tensor([[101, 40, 41, 42, 105]])
    before = verifier.model(ids)
    cut = hybrid_quality.fit_vocabulary(verifier, drafter)
    assert cut.spec.vocab_size == drafter.spec.vocab_size
    assert torch.equal(cut.model(ids), before[..., :drafter.spec.vocab_size])


def test_fit_vocabulary_refuses_another_tokenizer(tmp_path):
    folder = grown_verifier(tmp_path, ["<|a|>", "<|b|>", "<|c|>", "<|d|>"])
    drafter = load_model(DRAFTER, dtype="float32", device="cpu")
    verifier = load_model(folder, dtype="float32", device="cpu")
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {("Z" if t == "a" else t): i for t, i in vocab["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    assert hybrid_quality.fit_vocabulary(verifier, drafter).spec.vocab_size == drafter.spec.vocab_size
    with pytest.raises(SystemExit, match="does not share a tokenizer"):
        hybrid_quality.fit_vocabulary(load_model(other, dtype="float32", device="cpu"), drafter)
