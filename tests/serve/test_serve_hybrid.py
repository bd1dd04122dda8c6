"""Hybrid decoding (APD, speculative) through the HTTP layer in-process, with the real engine on the
tiny pair (tiny_pair.py): the production factory loads the verifier from the model entry, HTTP
text == the offline `LLM` with the same pair, usage reports both models' forwards, streaming sends
every committed span, and every bad hybrid field is a 400 naming it. Also the config side:
`verifier:` fields validated at start, configs/dream_apd.yaml.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from serve_testutil import in_process_http
from tiny_pair import DRAFTER, multi_step_prompt, verifier_folder

from dfastllm_ray.serve.app import check_model
from dfastllm_ray.serve.config import AppArgs, ModelConfig
from dfastllm_ray.serve.replica import build_engine

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"device": "cpu", "dtype": "float32", "max_num_seqs": 8, "kv_cache_mode": "dual"}
PROMPT = "Reverse the string: abcdef"
# R = 0 (the verifier's argmax is the target) and M = 8: several APD steps on the tiny pair
APD = {"decoding": "apd", "apd_mixture_weight": 0.0, "max_lookahead": 8}
SPEC = {"decoding": "speculative", "draft_tokens": 3}


@pytest.fixture(scope="module")
def verifier(tmp_path_factory) -> Path:
    return verifier_folder(tmp_path_factory.mktemp("pair"))


def model_entry(model_id: str, verifier: Path | None) -> ModelConfig:
    extra = {"verifier": {"model_source": str(verifier)}} if verifier else {}
    return ModelConfig(model_id=model_id, engine=ENGINE,
                       sampling_defaults={"max_tokens": 16, "block_length": 8}, **extra)


@pytest.fixture(scope="module")
def http(verifier):
    with in_process_http({"tiny-apd": model_entry("tiny-apd", verifier),
                          "tiny-llada": model_entry("tiny-llada", None)}) as client:
        yield client


@pytest.fixture(scope="module")
def offline(verifier):
    from dfastllm_ray import LLM
    return LLM(str(DRAFTER), device="cpu", dtype="float32", verifier=str(verifier))


def post(http, route: str, **body):
    return http.post(f"/v1/{route}", json={"model": "tiny-apd", "max_tokens": 16, **body})


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("knobs", [APD, SPEC], ids=["apd", "speculative"])
def test_completion_equals_offline_and_reports_both_forwards(http, offline, knobs):
    from dfastllm_ray import SamplingParams
    r = post(http, "completions", prompt=PROMPT, temperature=0.0, **knobs)
    assert r.status_code == 200, r.text
    want = offline.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, **knobs),
                            use_tqdm=False)[0]
    body = r.json()
    assert body["choices"][0]["text"] == want.text
    usage = body["usage"]
    assert usage["completion_tokens"] == len(want.token_ids)
    assert usage["drafter_forwards"] == usage["nfe"] == want.nfe
    assert usage["verifier_forwards"] == want.verifier_forwards >= 1


@pytest.mark.parametrize("knobs", [APD, SPEC], ids=["apd", "speculative"])
def test_chat_equals_offline(http, offline, knobs):
    from dfastllm_ray import SamplingParams
    messages = [{"role": "user", "content": PROMPT}]
    r = post(http, "chat/completions", messages=messages, temperature=0.0, **knobs)
    assert r.status_code == 200, r.text
    want = offline.chat(messages, SamplingParams(max_tokens=16, temperature=0.0, **knobs),
                        use_tqdm=False)[0]
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["usage"]["verifier_forwards"] == want.verifier_forwards


@pytest.mark.parametrize("knobs", [APD, SPEC], ids=["apd", "speculative"])
def test_stream_sends_every_committed_span(http, offline, knobs):
    """Hybrid decoding commits a span per step: one chunk per step, so several chunks for a
    prompt of two steps or more, joined equal to the non-streamed text; the usage chunk has both
    models' counts."""
    prompt = multi_step_prompt(offline, knobs)
    knobs = {**knobs, "temperature": 0.0}
    full = post(http, "completions", prompt=prompt, **knobs).json()
    r = post(http, "completions", prompt=prompt, stream=True,
             stream_options={"include_usage": True}, **knobs)
    assert r.status_code == 200, r.text
    chunks = sse_events(r.text)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == full["choices"][0]["text"]
    assert chunks[-1]["usage"]["verifier_forwards"] == full["usage"]["verifier_forwards"]
    assert len(texts) == full["usage"]["verifier_forwards"] >= 2    # one chunk per hybrid step


def test_diffusion_on_the_hybrid_model_has_no_verifier_usage(http):
    r = post(http, "completions", prompt=PROMPT)
    assert r.status_code == 200, r.text
    assert "verifier_forwards" not in r.json()["usage"]


def test_replica_counts_verifier_forwards(http):
    core = http.cores["tiny-apd"]
    before = core.counters.verifier_forwards
    body = post(http, "completions", prompt=PROMPT, temperature=0.0, **SPEC).json()
    assert core.counters.verifier_forwards - before == body["usage"]["verifier_forwards"]
    assert http.cores["tiny-llada"].counters.verifier_forwards == 0


@pytest.mark.parametrize("model,fields,param,words", [
    ("tiny-llada", {"decoding": "apd"}, "decoding", ["'apd'", "no verifier"]),
    ("tiny-llada", {"decoding": "speculative", "draft_tokens": 2}, "decoding", ["no verifier"]),
    ("tiny-llada", {"apd_mixture_weight": 0.5}, "apd_mixture_weight", ["0.5", "no verifier"]),
    ("tiny-llada", {"draft_tokens": 2}, "draft_tokens", ["no verifier"]),
    ("tiny-apd", {"decoding": "apd", "apd_mixture_weight": 1.5}, "apd_mixture_weight",
     ["1.5", "less than or equal to 1"]),
    ("tiny-apd", {"decoding": "apd", "kv_window": 0}, "kv_window", ["0", "greater than"]),
    ("tiny-apd", {"decoding": "speculative", "draft_tokens": 65}, "draft_tokens", ["65", "64"]),
    ("tiny-apd", {"decoding": "beam"}, "decoding", ["beam", "apd"]),
    ("tiny-apd", {"decoding": "apd", "draft_tokens": 3}, "draft_tokens",
     ["draft_tokens=3", 'decoding="speculative" only']),
    ("tiny-apd", {"decoding": "speculative", "max_lookahead": 8}, "max_lookahead",
     ["max_lookahead=8", 'decoding="apd" only']),
    ("tiny-apd", {"apd_mixture_weight": 0.5}, "apd_mixture_weight", ['decoding="apd" only']),
    ("tiny-apd", {"decoding": "apd", "steps": 4}, "steps", ["steps=4", "left to right"]),
    ("tiny-apd", {"decoding": "speculative", "threshold": 0.9}, "threshold", ["threshold=0.9"]),
])
def test_bad_hybrid_fields_are_400_naming_them(http, model, fields, param, words):
    for route, prompt in (("completions", {"prompt": PROMPT}),
                          ("chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = http.post(f"/v1/{route}", json={"model": model, **prompt, **fields})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        assert all(w in err["message"] for w in words), err["message"]


def test_explicit_diffusion_is_fine_without_a_verifier(http):
    r = http.post("/v1/completions", json={"model": "tiny-llada", "prompt": PROMPT,
                                           "decoding": "diffusion"})
    assert r.status_code == 200, r.text


def test_schema_documents_the_hybrid_fields(http):
    props = http.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"][
        "properties"]
    for name in ("decoding", "apd_mixture_weight", "kv_window", "max_lookahead", "draft_tokens"):
        assert props[name].get("description"), name
    assert props["draft_tokens"]["anyOf"][0]["maximum"] == 64


# ---- config ------------------------------------------------------------------------------
@pytest.mark.parametrize("verifier,field", [
    ({"model_sorce": "x"}, "model_sorce"),
    ({}, "model_source"),
    ({"model_source": ""}, "model_source"),
    ({"model_source": "x", "dtype": "fp8"}, "dtype"),
    ({"model_source": "x", "device": "cuda:1"}, "device"),   # always the model's own device
])
def test_bad_verifier_entry_rejected_at_start_naming_the_field(verifier, field):
    with pytest.raises(ValueError) as err:
        AppArgs.model_validate({"models": [{"model_id": "m", "verifier": verifier}]})
    assert field in str(err.value) and "verifier" in str(err.value)


def test_hybrid_default_without_a_verifier_fails_at_start():
    cfg = ModelConfig(model_id="m", sampling_defaults={"decoding": "apd"})
    with pytest.raises(ValueError, match=r"models\[m\]\.sampling_defaults: decoding='apd' needs "
                                         "a verifier"):
        check_model(cfg)


def test_unloadable_verifier_names_the_field(tmp_path):
    cfg = ModelConfig(model_id="m", engine=ENGINE, verifier={"model_source": str(tmp_path)})
    with pytest.raises(ValueError, match=r"models\[m\]\.verifier\.model_source="):
        build_engine(cfg)


def test_dream_apd_config_pairs_dream_with_qwen_on_one_gpu():
    cfg = yaml.safe_load((ROOT / "configs" / "dream_apd.yaml").read_text())
    model = AppArgs.model_validate(cfg["applications"][0]["args"]).models[0]
    assert model.model_source == "Dream-org/Dream-v0-Instruct-7B"
    assert model.verifier.model_source == "Qwen/Qwen2.5-0.5B"
    assert model.deployment.ray_actor_options["num_gpus"] == 1
    assert model.engine["device"] == "cuda" and model.sampling_defaults["decoding"] == "apd"
    check_model(model)
