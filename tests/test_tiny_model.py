"""The shipped tiny LLaDA: loads by the LLaDA-8B code path, answers held-out questions, and the
trainer that made it is reproducible (same seed -> same sha256)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dfastllm_ray
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.train import tasks
from dfastllm_ray.train.evaluate import evaluate
from dfastllm_ray.train.trainer import Batcher, TrainConfig, lr_factor, prepare, train

ASSET = Path(dfastllm_ray.__file__).parent / "assets" / "tiny-llada"
TINY = dict(steps=20, batch_size=8, warmup=5, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)


@pytest.fixture(scope="module")
def loaded():
    return load_model(ASSET, dtype="float32", device="cpu")


def test_checkpoint_folder_is_llada_format(loaded):
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    tok = loaded.tokenizer
    assert cfg["mask_token_id"] == tok.mask_token_id == loaded.spec.mask_token_id
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == tok.eos_token_id
    assert loaded.spec.eot_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert cfg["vocab_size"] == len(tok)
    with safe_open(str(ASSET / "model.safetensors"), "pt") as f:
        assert all(k.startswith("model.transformer.") for k in f.keys())
    size = sum(p.stat().st_size for p in ASSET.iterdir())
    assert size < 8 * 2 ** 20, f"checkpoint folder is {size / 2 ** 20:.1f} MiB"


def test_shipped_checkpoint_answers_heldout_questions(loaded):
    """Held-out questions through the reference schedule. The shipped model is under-trained
    (docs/tiny_model.md: it copies and reverses, arithmetic and counting are not learned yet), so
    this pins what it does today; raise the bars when a longer-trained checkpoint lands."""
    spec = loaded.spec
    examples = tasks.heldout_set(per_task=10, seed=0)
    acc = evaluate(loaded.model, loaded.tokenizer, examples, gen_length=16, block_length=16,
                   mask_id=spec.mask_token_id, stop_ids=set(spec.stop_token_ids))
    assert acc["copy"] >= 0.9 and acc["reverse"] >= 0.6 and acc["mean"] >= 0.35, acc


def test_training_is_reproducible(tmp_path):
    runs = [train(TrainConfig(out=str(tmp_path / name), seed=seed, **TINY))["sha256"]
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    for name in "ab":
        data = (tmp_path / name / "model.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == runs[0]


def test_rows_score_generation_positions_only(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), gen_min=16, gen_max=16, **{**TINY, "steps": 1})
    tokenizer, ids, _, _ = prepare(cfg)
    examples = [tasks.Example("add", "add 1+2", "3"), tasks.Example("copy", "copy abcdef", "abcdef")]
    x, gen = Batcher(tokenizer, ids, cfg)(examples)
    assert x.shape[1] == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "copy abcdef"}], add_generation_prompt=True)["input_ids"]) + 16
    for row, g, ex in zip(x.tolist(), gen.tolist(), examples):
        start = g.index(True)
        assert all(g[start:]) and not any(g[:start])            # prompt never scored
        answer = tokenizer.encode(ex.answer, add_special_tokens=False)
        assert row[start:start + len(answer) + 1] == answer + [ids["eot"]]
        assert set(row[start + len(answer) + 1:]) == {ids["eos"]}   # EOS fills the tail


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(out="unused", steps=100, warmup=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    assert torch.tensor(f).min() >= 0.1 - 1e-9
