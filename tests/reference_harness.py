"""Fixture-driven reference checks: every case of every `manifest.json` under the fixtures root.

The root is `$DFASTLLM_REFERENCE_DIR` when set (a folder laid out like the project's copy: one
subfolder per checkpoint, each with `manifest.json`, `fixtures.safetensors` and the checkpoint),
else `tests/fixtures/reference`. A case runs by its `kind`; an unknown kind, or a case a runner
cannot interpret, fails -- it is never skipped.

Kinds: "forward" (logits, here), "llada_generate" / "fastdllm_llada" (reference_llada.py),
"dream_diffusion_generate" / "fastdllm_dream" (reference_dream.py).
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

from dfastllm_ray.models.layers import key_padding_bias
from dfastllm_ray.models.loader import LoadedModel, load_model

DEFAULT_ROOT = Path(__file__).parent / "fixtures" / "reference"
LOGITS_RTOL = 1e-4            # max |ours - ref| / max |ref|, float32 on CPU


def reference_root() -> Path:
    return Path(os.environ.get("DFASTLLM_REFERENCE_DIR") or DEFAULT_ROOT)


def manifest_folders(root: Path | None = None) -> list[Path]:
    root = root or reference_root()
    return sorted(p.parent for p in root.glob("*/manifest.json"))


def all_cases(root: Path | None = None) -> list[tuple[Path, str]]:
    """(folder, case name) for every case under the root, in manifest order."""
    out = []
    for folder in manifest_folders(root):
        out += [(folder, c["name"]) for c in read_manifest(folder)["cases"]]
    return out


@lru_cache(maxsize=None)
def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@dataclass
class Fixture:
    manifest: dict
    tensors: dict                 # T in the manifest's calls: name -> tensor
    loaded: LoadedModel           # the folder's checkpoint, float32 on CPU

    def case(self, name: str) -> dict:
        matches = [c for c in self.manifest["cases"] if c["name"] == name]
        assert len(matches) == 1, f"case {name!r}: {len(matches)} entries in the manifest"
        return matches[0]


@lru_cache(maxsize=None)
def load_fixture(folder: Path) -> Fixture:
    m = read_manifest(folder)
    tensors = load_file(str(folder / m.get("tensor_file", "fixtures.safetensors")))
    return Fixture(m, tensors, load_model(folder, dtype="float32", device="cpu"))


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, what: str,
                        rows: torch.Tensor | None = None) -> None:
    """Relative error max|ours - ref| / max|ref| <= 1e-4 (over rows==True positions if given)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if rows is not None:
        ours, ref = ours[rows.bool()], ref[rows.bool()]
    err = (ours.double() - ref.double()).abs().max() / ref.double().abs().max()
    assert err <= LOGITS_RTOL, f"{what}: relative logits error {float(err):.3g} > {LOGITS_RTOL}"


# Forward calls of the "forward" kind, by output tensor (the manifests' `calls`). `padded` means
# "with the fixture's attention mask": the 4-D pair mask when the folder has one (Dream: pad
# rows are garbage and are not compared), else the 2-D key-padding mask (LLaDA: pad rows are
# computed normally and compared). `positions`: the stored position ids when present, else
# absolute 0..L-1. An output not listed here fails the case.
FORWARD_CALLS = {
    "logits.out": dict(ids="logits.input_ids", padded=False, positions=False),
    "logits.out_padded": dict(ids="logits.input_ids_padded", padded=True, positions=True),
    "logits.out_padded_ids_without_mask": dict(ids="logits.input_ids_padded", padded=False,
                                               positions=False),
    "logits.out_padded_fastdllm_modeling": dict(ids="logits.input_ids_padded", padded=True,
                                                positions=False),
}


def run_forward_case(case: dict, T: dict, loaded: LoadedModel) -> None:
    for out_key in case["calls"]:
        assert out_key in FORWARD_CALLS, (
            f"forward output {out_key!r} ({case['calls'][out_key]!r}) has no recipe in "
            "tests/reference_harness.py FORWARD_CALLS")
        how = FORWARD_CALLS[out_key]
        ids = T[how["ids"]]
        bias, compare_rows = None, None
        if how["padded"] and "logits.attention_mask_4d_padded" in T:
            pair = T["logits.attention_mask_4d_padded"]                       # (B, 1, L, L) bool
            bias = torch.zeros(pair.shape).masked_fill(~pair, torch.finfo(torch.float32).min)
            compare_rows = T["logits.attention_mask_padded"]                  # real query rows
        elif how["padded"]:
            bias = key_padding_bias(T["logits.attention_mask_padded"])        # (B, 1, 1, L)
        positions = T.get("logits.position_ids_padded") if how["positions"] else None
        with torch.no_grad():
            ours = loaded.model(ids, positions=positions, attn_bias=bias)
        assert_close_logits(ours, T[out_key], f"{case['name']}:{out_key}", compare_rows)


# The generation runners live beside this file and use its helpers, so they are imported when
# their kind runs (no import cycle); an import error there fails those cases, it is not hidden.
def _run_llada(case: dict, T: dict, loaded: LoadedModel) -> None:
    from reference_llada import run_llada_case
    run_llada_case(case, T, loaded)


def _run_dream(case: dict, T: dict, loaded: LoadedModel) -> None:
    from reference_dream import run_dream_case
    run_dream_case(case, T, loaded)


RUNNERS: dict[str, Callable[[dict, dict, LoadedModel], None]] = {
    "forward": run_forward_case,
    "llada_generate": _run_llada,
    "fastdllm_llada": _run_llada,
    "dream_diffusion_generate": _run_dream,
    "fastdllm_dream": _run_dream,
}


def run_case(folder: Path, name: str) -> None:
    fx = load_fixture(folder)
    case = fx.case(name)
    kind = case.get("kind")
    assert kind in RUNNERS, (f"{folder.name}/{name}: unknown case kind {kind!r}; "
                             f"known kinds: {sorted(RUNNERS)}")
    RUNNERS[kind](case, fx.tensors, fx.loaded)
