"""Helpers for engine tests with the tiny reference checkpoints (CPU, float32)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from safetensors.torch import load_file

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.models.loader import LoadedModel, load_model
from dfastllm_ray.sampling.params import SamplingParams

REFERENCE = Path(__file__).parents[1] / "fixtures" / "reference"
NUM_PAGES = 512


@lru_cache(maxsize=None)
def tiny(name: str) -> LoadedModel:
    return load_model(REFERENCE / name, dtype="float32", device="cpu")


@lru_cache(maxsize=None)
def fixture(name: str) -> tuple[dict, dict]:
    folder = REFERENCE / name
    return json.loads((folder / "manifest.json").read_text()), load_file(str(folder / "fixtures.safetensors"))


def engine(name: str, mode: str = "none", **cfg) -> Engine:
    """An engine over a tiny checkpoint. default_speed None unless given: these tests pin the
    engine's mechanics on the reference schedule when a request sets no knob."""
    cfg = {"page_size": 4, "num_pages": NUM_PAGES, "default_speed": None, **cfg}
    return Engine(tiny(name), EngineConfig(kv_cache_mode=mode, **cfg))


def run_all(eng: Engine, requests: dict[str, tuple[list[int], SamplingParams]],
            stagger: int = 0) -> dict:
    """Submit (all at once, or `stagger` per step) and step until done -> final output per id."""
    pending, finals = list(requests.items()), {}
    while pending or eng.has_unfinished():
        take = stagger or len(pending)
        for rid, (prompt, params) in pending[:take]:
            eng.add_request(rid, prompt, params)
        pending = pending[take:]
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def case_params(case: dict) -> SamplingParams:
    """A deterministic manifest case's official kwargs as SamplingParams."""
    kw = case["kwargs"]
    if case["kind"] in ("llada_generate", "fastdllm_llada"):
        return SamplingParams(max_tokens=kw["gen_length"], steps=kw["steps"],
                              block_length=kw["block_length"], temperature=kw["temperature"],
                              remasking=kw["remasking"], threshold=kw.get("threshold"),
                              factor=kw.get("factor"))
    alg, threshold = kw.get("alg", "origin"), kw.get("threshold")
    if alg == "confidence_threshold":         # Fast-dLLM Dream: token-probability confidence
        alg = "maskgit_plus"
    else:
        threshold = None
    return SamplingParams(max_tokens=kw["max_new_tokens"], steps=kw["steps"],
                          temperature=kw.get("temperature", 0.0), top_p=kw.get("top_p"),
                          top_k=kw.get("top_k"), alg=alg, alg_temp=kw.get("alg_temp"),
                          threshold=threshold, block_length=kw.get("block_length"))


def case_mode(case: dict) -> str:
    name = case["name"]
    return "prefix" if ".prefix." in name else "dual" if ".dual." in name else "none"


# Deterministic fixture cases the engine does not run, each with the reason (nothing is dropped
# silently: test_engine_reference checks that every deterministic case is run or listed here).
REFUSED = {
    "cfg": "classifier-free guidance (cfg_scale > 0) doubles every forward; the engine refuses it "
           "with a ValueError and sampling.llada_generate runs it",
    "llada_padding": "LLaDA keeps absolute RoPE positions under left padding, so a padded row is a "
                     "different canvas from its unpadded prompt; the engine never pads a request",
}


def refusal(case: dict) -> str | None:
    """Why the engine does not reproduce this deterministic case (None: it does)."""
    kw = case["kwargs"]
    if kw.get("cfg_scale"):
        return "cfg"
    if kw.get("attention_mask") and "padded" in kw["attention_mask"] and \
            case["kind"] in ("llada_generate", "fastdllm_llada"):
        return "llada_padding"
    return None


def deterministic_cases(name: str) -> list[dict]:
    manifest, _ = fixture(name)
    return [c for c in manifest["cases"][1:] if not c.get("seed")]


def engine_cases(name: str) -> list[str]:
    """Deterministic cases an engine request reproduces: no seed, not refused (Dream's padded
    rows are run unpadded: Dream's positions follow the mask, so padded == unpadded)."""
    return [c["name"] for c in deterministic_cases(name) if refusal(c) is None]


def unpadded_prompts(case: dict, T: dict) -> list[list[int]]:
    """The case's prompt rows, left pads (attention mask 0) removed."""
    kw = case["kwargs"]
    prompt = T[kw["prompt"]]
    if "rows" in kw:
        prompt = prompt[kw["rows"][0]:kw["rows"][1]]
    mask = T[kw["attention_mask"]] if kw.get("attention_mask") else None
    rows = []
    for r in range(prompt.shape[0]):
        ids = prompt[r].tolist()
        rows.append([t for t, m in zip(ids, mask[r].tolist()) if m] if mask is not None else ids)
    return rows


def expected_tokens(seq: list[int], prompt_len: int, stop_ids, mask_id: int) -> list[int]:
    """The reference's generated ids as the engine returns them: cut before the first EOS/EOT,
    masks dropped."""
    return [t for t in expected_span(seq, prompt_len, stop_ids) if t != mask_id]


def expected_span(seq: list[int], prompt_len: int, stop_ids) -> list[int]:
    """The reference's generated positions up to the first EOS/EOT, masks included."""
    gen = seq[prompt_len:]
    cut = next((i for i, t in enumerate(gen) if t in stop_ids), len(gen))
    return gen[:cut]
