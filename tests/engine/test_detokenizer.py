"""Text, deltas and stop strings, with a one-character-per-token tokenizer."""
from __future__ import annotations

from dataclasses import replace

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.detokenizer import Detokenizer
from dfastllm_ray.engine.engine import Engine
from dfastllm_ray.engine.outputs import RequestOutput
from dfastllm_ray.sampling.params import SamplingParams
from engine_factories import make_request
from engine_models import run_all, tiny


class CharTokenizer:
    """Token t is the letter chr(97 + t % 26)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in ids)

    def __call__(self, text):
        return {"input_ids": [ord(c) - 97 for c in text]}


def out(rid: str, ids: list[int], finished=False) -> RequestOutput:
    return RequestOutput(rid, "", "", ids, [], finished, None, 1, 3)


def test_deltas_and_stop_string_cut():
    d = Detokenizer(CharTokenizer())
    first = d.attach([out("a", [0, 1])], {"a": ("cd",)})[0]
    second = d.attach([out("a", [0, 1, 2, 3, 4], finished=True)], {"a": ("cd",)})[0]
    assert (first.text, first.delta_text) == ("ab", "ab")
    assert (second.text, second.delta_text) == ("ab", "")
    req = make_request("a", stop=("cd",))
    assert d.stop_cut(req, [0, 1, 2, 3, 4]) == 4 and d.stop_cut(req, [0, 1]) is None


def test_a_possible_stop_string_start_is_held_back_until_the_next_block():
    d = Detokenizer(CharTokenizer())
    stops = {"a": ("cd",)}
    first = d.attach([out("a", [0, 1, 2])], stops)[0]              # "abc": "c" may start "cd"
    second = d.attach([out("a", [0, 1, 2, 4], finished=True)], stops)[0]   # "abce": it did not
    assert (first.text, second.text, second.delta_text) == ("ab", "abce", "ce")


def test_engine_finishes_at_a_stop_string():
    loaded = replace(tiny("llada-tiny"), tokenizer=CharTokenizer())
    params = SamplingParams(max_tokens=32, block_length=8, steps=32)
    prompt = loaded.tokenizer("hello")["input_ids"]
    eng = Engine(loaded, EngineConfig(kv_cache_mode="dual", page_size=4, num_pages=64))
    full = run_all(eng, {"x": (prompt, params)})["x"]
    stop = full.text[3:5]                           # two letters from the first block
    cut = run_all(eng, {"y": (prompt, replace(params, stop=(stop,)))})["y"]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert full.text.startswith(cut.text) and cut.nfe < full.nfe and cut.nfe_saved > 0
