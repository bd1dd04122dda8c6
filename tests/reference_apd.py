"""Fixture-driven APD checks: every case of every pair's `manifest.json` under the APD root.

The root is `$DFASTLLM_APD_REFERENCE_DIR` when set, else `tests/fixtures/apd`: one folder per
pair, each with `dream/` (the drafter checkpoint), `verifier/` (a causal LM checkpoint),
`manifest.json` and `fixtures.safetensors`. A case runs by its `kind`; an unknown kind, an
unknown call argument or a missing field fails the case -- it is never skipped.

Kinds: "causal_forward" (the verifier's logits), "apd_diffusion_generate" and "leftright"
(`apd_generate`: sequences token for token, drafter forwards, verifier forwards, tokens
generated and the tokens committed at each step). Seeded cases call `torch.manual_seed(seed)`
right before the loop, as the fixture maker did before `diffusion_generate`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from dfastllm_ray.models.loader import LoadedModel, load_model
from dfastllm_ray.sampling.apd import APDParams
from dfastllm_ray.sampling.apd_generate import apd_generate

DEFAULT_ROOT = Path(__file__).parent / "fixtures" / "apd"
LOGITS_RTOL = 1e-4              # max |ours - ref| / max |ref|, float32 on CPU
# the official call's kwargs -> APDParams fields (None: read but not a knob of the loop)
KWARGS = {"max_new_tokens": "max_new_tokens", "apd_mixture_weight": "apd_mixture_weight",
          "kv_window": "kv_window", "max_lookahead": "max_lookahead",
          "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "tokens_per_step": "tokens_per_step", "alg": None, "output_history": None,
          "return_dict_in_generate": None,
          # read by diffusion_generate but never by apd_sample (the time schedule of _sample)
          "steps": None, "eps": None, "alg_temp": None}
ALGS = {"apd_diffusion_generate": "apd", "leftright": "leftright"}


def apd_root() -> Path:
    return Path(os.environ.get("DFASTLLM_APD_REFERENCE_DIR") or DEFAULT_ROOT)


def all_cases(root: Path | None = None) -> list[tuple[Path, str]]:
    """(pair folder, case name) for every case under the root, in manifest order."""
    root = root or apd_root()
    return [(m.parent, c["name"]) for m in sorted(root.glob("*/manifest.json"))
            for c in json.loads(m.read_text())["cases"]]


@dataclass
class Pair:
    manifest: dict
    tensors: dict                  # T in the manifest's calls
    dream: LoadedModel
    verifier: LoadedModel
    dream_config: dict             # dream/config.json

    def case(self, name: str) -> dict:
        matches = [c for c in self.manifest["cases"] if c["name"] == name]
        assert len(matches) == 1, f"case {name!r}: {len(matches)} entries in the manifest"
        return matches[0]


@lru_cache(maxsize=None)
def load_pair(folder: Path) -> Pair:
    m = json.loads((folder / "manifest.json").read_text())
    load = lambda sub: load_model(folder / sub, dtype="float32", device="cpu")  # noqa: E731
    return Pair(m, load_file(str(folder / "fixtures.safetensors")), load("dream"), load("verifier"),
                json.loads((folder / "dream" / "config.json").read_text()))


class Counting:
    """Wraps a model and counts its forwards."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def run_causal_forward(case: dict, pair: Pair) -> None:
    names = case["tensors"]
    ids = [n for n in names if n.endswith("input_ids")]
    outs = [n for n in names if n.endswith("logits")]
    assert len(names) == 2 and len(ids) == 1 and len(outs) == 1, (
        f"{case['name']}: tensors {names} are not one '*input_ids' and one '*logits'; a causal "
        "forward with other inputs (masks, positions) has no recipe here")
    with torch.no_grad():
        ours = pair.verifier.model(pair.tensors[ids[0]])
    ref = pair.tensors[outs[0]]
    assert ours.shape == ref.shape, f"{case['name']}: {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours.double() - ref.double()).abs().max() / ref.double().abs().max()
    assert err <= LOGITS_RTOL, f"{case['name']}: relative logits error {float(err):.3g}"


def case_params(case: dict, use_cache: bool) -> APDParams:
    kw = case["kwargs"]
    unknown = set(kw) - set(KWARGS)
    assert not unknown, f"{case['name']}: call arguments {sorted(unknown)} have no mapping"
    assert kw.get("alg") == ALGS[case["kind"]], f"{case['name']}: alg={kw.get('alg')!r}"
    args = {KWARGS[k]: v for k, v in kw.items() if KWARGS[k] is not None}
    return APDParams(**args, diffusion_cache=bool(use_cache))


def run_apd_generate(case: dict, pair: Pair) -> None:
    # the Dream config's use_cache decides whether kv_window has any effect (section 8, step 1)
    use_cache = case.get("config_use_cache", pair.dream_config.get("use_cache", False))
    params = case_params(case, use_cache)
    dream, verifier = Counting(pair.dream.model), Counting(pair.verifier.model)
    torch.manual_seed(case["seed"])
    out = apd_generate(dream, pair.dream.spec, verifier, pair.tensors[case["prompt"]], params)
    name, ref = case["name"], pair.tensors[case["sequences"]]
    assert out.sequences.shape == ref.shape, f"{name}: shape {tuple(out.sequences.shape)}"
    diff = (out.sequences != ref).nonzero()
    assert diff.numel() == 0, f"{name}: first differing canvas position {diff[0].tolist()}"
    assert out.acceptance_counts == case["acceptance_counts"], f"{name}: acceptance counts"
    assert (dream.calls, out.dream_forwards) == (case["nfe_diffusion"],) * 2, (
        f"{name}: dLLM forwards")
    assert (verifier.calls, out.verifier_forwards) == (case["verifier_forwards"],) * 2, (
        f"{name}: verifier forwards")
    assert out.tokens_generated == case["tokens_generated"], f"{name}: tokens generated"


RUNNERS: dict[str, Callable[[dict, Pair], None]] = {
    "causal_forward": run_causal_forward,
    "apd_diffusion_generate": run_apd_generate,
    "leftright": run_apd_generate,
}


def run_case(folder: Path, name: str) -> None:
    pair = load_pair(folder)
    case = pair.case(name)
    kind = case.get("kind")
    assert kind in RUNNERS, (f"{folder.name}/{name}: unknown case kind {kind!r}; "
                             f"known kinds: {sorted(RUNNERS)}")
    RUNNERS[kind](case, pair)
