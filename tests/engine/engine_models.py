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
    cfg = {"page_size": 4, "num_pages": NUM_PAGES, **cfg}
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


def engine_cases(name: str) -> list[str]:
    """Cases an engine request reproduces: deterministic (no seed), no CFG, no padding."""
    manifest, _ = fixture(name)
    return [c["name"] for c in manifest["cases"][1:]
            if not c.get("seed") and not c["kwargs"].get("cfg_scale")
            and not c["kwargs"].get("attention_mask")]


def expected_tokens(seq: list[int], prompt_len: int, stop_ids, mask_id: int) -> list[int]:
    """The reference's generated ids as the engine returns them: cut before the first EOS/EOT,
    masks dropped."""
    gen = seq[prompt_len:]
    cut = next((i for i, t in enumerate(gen) if t in stop_ids), len(gen))
    return [t for t in gen[:cut] if t != mask_id]
