"""The shipped trained tiny-sdar (docs/tiny_model.md) through the engine: on held-out questions
the engine, all requests batched, in both block-store orders, gives the reference loop's replies
at `top_k=1` (its greedy form) and answers as the trainer measured (>= 0.9 mean)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.sampling.params import SamplingParams
from dfastllm_ray.train import tasks
from dfastllm_ray.train.evaluate import prompt_ids, reply_text, sdar_decode

FOLDER = Path(__file__).parents[2] / "dfastllm_ray" / "assets" / "tiny-sdar"
GEN, BLOCK = 32, 4


@lru_cache(maxsize=None)
def model():
    return load_model(FOLDER, "float32", "cpu")


@lru_cache(maxsize=None)
def questions() -> tuple:
    loaded = model()
    return tuple((ex, prompt_ids(loaded.tokenizer, ex.prompt)) for ex in tasks.heldout_set(6))


def engine_replies(strategy: str, block_store: str) -> list[str]:
    loaded = model()
    stops = set(loaded.spec.stop_token_ids)
    eng = Engine(loaded, EngineConfig(max_num_seqs=len(questions()), block_store=block_store,
                                      exact_ties=True))
    for i, (_, ids) in enumerate(questions()):
        eng.add_request(str(i), ids, SamplingParams(max_tokens=GEN, block_length=BLOCK, top_k=1,
                                                    temperature=1.0, remasking_strategy=strategy))
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    return [reply_text(loaded.tokenizer, done[str(i)].token_ids[:GEN], stops)
            for i in range(len(questions()))]


def reference_replies(strategy: str) -> list[str]:
    loaded = model()
    stops = set(loaded.spec.stop_token_ids)
    out = []
    for _, ids in questions():
        gen = sdar_decode(loaded.model, torch.tensor([ids]), GEN, BLOCK, stops, strategy)
        out.append(reply_text(loaded.tokenizer, gen[0].tolist(), stops))
    return out


@pytest.mark.parametrize("block_store", ["separate", "fused"])
@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "sequential"])
def test_engine_replies_equal_the_reference_and_answer(strategy, block_store):
    got = engine_replies(strategy, block_store)
    assert got == reference_replies(strategy)
    right = [reply == ex.answer for (ex, _), reply in zip(questions(), got)]
    assert sum(right) / len(right) >= 0.9, list(zip([ex.answer for ex, _ in questions()], got))
