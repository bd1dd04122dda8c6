"""Hybrid decoding for real: a model entry with a `verifier` on the session's Ray Serve cluster (an
app under /hybrid beside configs/tiny.yaml's), the real engine on the tiny pair (tiny_pair.py) and
the official `openai` client: APD and speculative, chat and completions, streamed and not, equal
to the offline `LLM`; usage and Prometheus report the verifier's forwards; bad hybrid fields are
400s naming them, on the model without a verifier too.
"""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from serve_testutil import API_KEY, FAST_SHUTDOWN
from tiny_pair import DRAFTER, multi_step_prompt, verifier_folder

pytestmark = pytest.mark.ray
MODEL = "tiny-apd"
PROMPT = "Reverse the string: abcdef"
KNOBS = {"apd": {"decoding": "apd", "apd_mixture_weight": 0.0, "max_lookahead": 8},
         "speculative": {"decoding": "speculative", "draft_tokens": 3}}
NO_CPU = {**FAST_SHUTDOWN, "ray_actor_options": {"num_cpus": 0}}


def hybrid_args(verifier) -> dict:
    return {"api_keys_env": None, "api_keys": [API_KEY], "ingress": NO_CPU,
            "models": [{"model_id": MODEL, "verifier": {"model_source": str(verifier)},
                        "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 8,
                                   "kv_cache_mode": "dual"},
                        "sampling_defaults": {"max_tokens": 16, "block_length": 8},
                        "batcher": {"deployment": NO_CPU}, "deployment": NO_CPU}]}


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    return verifier_folder(tmp_path_factory.mktemp("ray-pair"))


@pytest.fixture(scope="module")
def hybrid_url(serve_url, verifier):
    from serve_testutil import ready_app
    yield from ready_app(serve_url, "hybrid", hybrid_args(verifier))


@pytest.fixture(scope="module")
def client(hybrid_url):
    return openai.OpenAI(base_url=f"{hybrid_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(verifier):
    from dfastllm_ray import LLM
    return LLM(str(DRAFTER), device="cpu", dtype="float32", verifier=str(verifier))


def expected(offline, knobs: dict, chat: bool, prompt: str = PROMPT):
    from dfastllm_ray import SamplingParams
    params = SamplingParams(max_tokens=16, temperature=0.0, **knobs)
    if chat:
        return offline.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
    return offline.generate([prompt], params, use_tqdm=False)[0]


def check_usage(usage, want) -> None:
    extra = usage.model_dump()
    assert usage.completion_tokens == len(want.token_ids)
    assert extra["drafter_forwards"] == extra["nfe"] == want.nfe
    assert extra["verifier_forwards"] == want.verifier_forwards >= 1


@pytest.mark.parametrize("mode", KNOBS)
def test_completion_and_chat_equal_offline(client, offline, mode):
    knobs = KNOBS[mode]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.0,
                                  extra_body=knobs)
    want = expected(offline, knobs, chat=False)
    assert r.choices[0].text == want.text
    check_usage(r.usage, want)
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=16, temperature=0.0, extra_body=knobs)
    want = expected(offline, knobs, chat=True)
    assert c.choices[0].message.content == want.text
    check_usage(c.usage, want)


@pytest.mark.parametrize("mode", KNOBS)
def test_streams_send_every_committed_span(client, offline, mode):
    knobs = KNOBS[mode]
    prompt = multi_step_prompt(offline, knobs)       # two hybrid steps or more on this pair
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body=knobs)
    texts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
        else:
            usage = chunk.usage
    want = expected(offline, knobs, chat=False, prompt=prompt)
    assert "".join(texts) == want.text
    assert len(texts) == want.verifier_forwards >= 2, texts      # one chunk per hybrid step
    check_usage(usage, want)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=16,
        temperature=0.0, stream=True, extra_body=knobs)
    parts = [ch.choices[0].delta.content or "" for ch in chat if ch.choices]
    assert "".join(parts) == expected(offline, knobs, chat=True).text


@pytest.mark.parametrize("model,fields,param", [
    ("tiny-llada", {"decoding": "apd"}, "decoding"),
    ("tiny-llada", {"draft_tokens": 2}, "draft_tokens"),
    (MODEL, {"decoding": "apd", "apd_mixture_weight": 1.5}, "apd_mixture_weight"),
    (MODEL, {"decoding": "speculative", "draft_tokens": 0}, "draft_tokens"),
    (MODEL, {"decoding": "apd", "draft_tokens": 3}, "draft_tokens"),
    (MODEL, {"decoding": "fast"}, "decoding"),
])
def test_bad_hybrid_fields_are_400_naming_them(client, serve_url, model, fields, param):
    base = serve_url if model == "tiny-llada" else str(client.base_url).rstrip("/").rsplit("/v1", 1)[0]
    api = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=model, prompt=PROMPT, max_tokens=8, extra_body=fields)
    assert err.value.param == param, err.value.body
    assert param in err.value.message


def test_verifier_metrics_reach_prometheus(ray_cluster, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                              extra_body=KNOBS["speculative"])
    wanted = {"ray_dfastllm_verifier_forwards_total",
              "ray_dfastllm_accepted_tokens_per_verifier_forward_bucket"}
    deadline, lines = time.time() + 30, []
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_cluster}/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if f'model="{MODEL}"' in ln]
        if wanted <= {ln.split("{")[0] for ln in lines}:
            break
        time.sleep(0.5)
    assert wanted <= {ln.split("{")[0] for ln in lines}
    total = [ln for ln in lines if ln.startswith("ray_dfastllm_verifier_forwards_total")]
    assert float(total[0].rsplit(" ", 1)[1]) >= 1
