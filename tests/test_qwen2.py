"""Native Qwen2ForCausalLM: the APD fixture's verifier logits, exact KV cache, tied/untied folders.

The root of the APD fixtures is `$DFASTLLM_APD_REFERENCE_DIR` when set, else the vendored copy;
every pair's `causal_forward` case is checked here and again in tests/test_reference_apd.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfastllm_ray.models.causal_kv import CausalKV
from dfastllm_ray.models.loader import load_model

ROOT = Path(os.environ.get("DFASTLLM_APD_REFERENCE_DIR")
            or Path(__file__).parent / "fixtures" / "apd")
PAIRS = sorted(p.parent for p in ROOT.glob("*/manifest.json"))
LOGITS_RTOL = 1e-4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def test_pairs_found():
    assert PAIRS, f"no */manifest.json under {ROOT}"


@pytest.mark.parametrize("pair", PAIRS, ids=[p.name for p in PAIRS])
def test_verifier_logits_equal_the_fixture(pair):
    lm = load_model(pair / "verifier", dtype="float32", device="cpu")
    assert lm.spec.arch == "qwen2" and lm.spec.causal
    T = load_file(str(pair / "fixtures.safetensors"))
    with torch.no_grad():
        ours = lm.model(T["verifier.input_ids"])
    assert ours.shape == T["verifier.logits"].shape
    assert relative_error(ours, T["verifier.logits"]) <= LOGITS_RTOL


@pytest.fixture(scope="module")
def verifier():
    return load_model(PAIRS[0] / "verifier", dtype="float32", device="cpu").model


def ids_for(model, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.spec.vocab_size, (2, length), generator=g)


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(verifier):
    ids = ids_for(verifier, 20)
    full = verifier(ids)
    kv = CausalKV()
    chunks = [7, 1, 1, 5, 6]                 # prefill, single tokens, then drafts of several
    out, start = [], 0
    for n in chunks:
        out.append(verifier(ids[:, start:start + n], kv=kv))
        start += n
    assert kv.length == 20
    assert relative_error(torch.cat(out, 1), full) <= 1e-5


@torch.no_grad()
def test_truncate_then_append_equals_fresh(verifier):
    ids = ids_for(verifier, 16, seed=1)
    other = ids_for(verifier, 16, seed=2)
    kv = CausalKV()
    verifier(ids[:, :10], kv=kv)
    verifier(other[:, 10:16], kv=kv)        # a draft that is rejected ...
    kv.truncate(10)                          # ... is dropped
    assert kv.length == 10
    resumed = verifier(ids[:, 10:16], kv=kv)
    fresh = verifier(ids)[:, 10:16]
    assert relative_error(resumed, fresh) <= 1e-5
    with pytest.raises(ValueError, match=r"truncate\(length=17\) is invalid: the cache holds 16"):
        kv.truncate(17)


def write_hf_folder(folder: Path, tie: bool, keep_lm_head_copy: bool = False):
    """A tiny random checkpoint written by transformers itself (official names and layout)."""
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM as HFQwen2
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=128)
    hf = HFQwen2(cfg).eval()
    with torch.no_grad():                   # biases start at zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf.save_pretrained(folder, safe_serialization=True)
    if keep_lm_head_copy:                   # some exports of tied models carry the copy anyway
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, str(folder / "model.safetensors"))
    return hf


@pytest.mark.parametrize("tie,copy", [(False, False), (True, False), (True, True)],
                         ids=["untied", "tied", "tied-with-lm_head-copy"])
def test_loads_tied_and_untied_checkpoints(tmp_path, tie, copy):
    hf = write_hf_folder(tmp_path, tie, copy)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is tie
    lm = load_model(tmp_path, dtype="float32", device="cpu")
    assert lm.model.tie is tie and lm.spec.rope_theta == 1e6 and lm.spec.rms_norm_eps == 1e-5
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(lm.model(ids), hf(ids).logits) <= LOGITS_RTOL


def test_unsupported_config_is_named(tmp_path):
    write_hf_folder(tmp_path, tie=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rope_scaling=\{'type': 'yarn'.*not supported"):
        load_model(tmp_path, dtype="float32", device="cpu")
