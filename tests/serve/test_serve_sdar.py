"""SDAR (block diffusion) through the HTTP layer in-process, with the real engine (tiny_sdar.py):
the OpenAI routes answer with the offline `LLM`'s text, the checkpoint's block size is the
default block, a stream ends with [DONE], `remasking_strategy` is its knob, and the other
families' knobs (and its knob on them) are 400s naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_testutil import in_process_http
from tiny_sdar import BLOCK, sdar_folder

from dfastllm_ray.serve.config import ModelConfig, shipped_tiny_model

ENGINE = {"device": "cpu", "dtype": "float32", "max_num_seqs": 8, "kv_cache_mode": "dual"}
PROMPT = "Reverse the string: abcdef"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sdar_folder(tmp_path_factory.mktemp("sdar"))


@pytest.fixture(scope="module")
def http(folder):
    entries = {"tiny-sdar": ModelConfig(model_id="tiny-sdar", model_source=str(folder),
                                        engine=ENGINE),
               "tiny-llada": ModelConfig(model_id="tiny-llada", model_source=shipped_tiny_model(),
                                         engine=ENGINE)}
    with in_process_http(entries) as client:
        yield client


def post(http, route: str, model: str = "tiny-sdar", **body):
    return http.post(f"/v1/{route}", json={"model": model, "max_tokens": 10, **body})


@pytest.mark.parametrize("strategy", ["sequential", "low_confidence_static",
                                      "low_confidence_dynamic"])
def test_completion_equals_offline(http, folder, strategy):
    from dfastllm_ray import LLM, SamplingParams
    knobs = {"temperature": 0.0, "remasking_strategy": strategy}
    r = post(http, "completions", prompt=PROMPT, **knobs)
    assert r.status_code == 200, r.text
    llm = LLM(str(folder), device="cpu", dtype="float32")
    want = llm.generate([PROMPT], SamplingParams(max_tokens=10, **knobs), use_tqdm=False)[0]
    body = r.json()
    assert body["choices"][0]["text"] == want.text
    assert body["usage"]["completion_tokens"] == len(want.token_ids) <= 10
    assert body["usage"]["nfe"] == want.nfe


def test_the_checkpoint_block_is_the_default_and_a_stream_ends_with_done(http):
    full = post(http, "completions", prompt=PROMPT, temperature=0.0).json()
    r = post(http, "completions", prompt=PROMPT, temperature=0.0, stream=True)
    assert r.status_code == 200, r.text
    lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == \
        full["choices"][0]["text"]
    # blocks of 4 from position 0: 10 tokens after a prompt span 3 or 4 blocks, each streamed
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) >= 10 // BLOCK


def test_chat_answers(http):
    r = post(http, "chat/completions", messages=[{"role": "user", "content": PROMPT}],
             temperature=0.7, top_p=0.9, seed=3)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("model,fields,param,words", [
    ("tiny-sdar", {"remasking": "random"}, "remasking", ["SDAR-family", "remasking"]),
    ("tiny-sdar", {"alg": "entropy"}, "alg", ["SDAR-family"]),
    ("tiny-sdar", {"threshold": 0.5, "remasking_strategy": "sequential"}, "threshold",
     ["low_confidence_dynamic"]),
    ("tiny-sdar", {"remasking_strategy": "entropy_bounded"}, "remasking_strategy", []),
    ("tiny-sdar", {"kv_cache_mode": "prefix"}, "kv_cache_mode", ["block-diffusion"]),
    ("tiny-sdar", {"steps": 10**9}, "steps", ["1000000000", "at most 12"]),
    ("tiny-llada", {"remasking_strategy": "sequential"}, "remasking_strategy",
     ["LLaDA-family"]),
])
def test_foreign_and_bad_knobs_are_400s_naming_the_field(http, model, fields, param, words):
    r = post(http, "completions", model=model, prompt=PROMPT, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err
