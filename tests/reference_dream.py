"""Run one Dream manifest case (`dream_diffusion_generate` | `fastdllm_dream`) and check it.

The manifest's `kwargs` are the official call's arguments; they map onto `SamplingParams` and
`dream_generate`'s cache mode. Checked: token-identical sequences, the per-step history where the
case has one, NFE, the input length of every forward, and the dumped per-forward logits.
Seeded cases call `torch.manual_seed(seed)` right before the loop, as the fixture harness did
before `diffusion_generate`; the loop draws from the global RNG in the official order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dfastllm_ray.sampling.dream_generate import dream_generate
from dfastllm_ray.sampling.params import SamplingParams

DREAM_KINDS = ("dream_diffusion_generate", "fastdllm_dream")
KNOWN_KWARGS = {"max_new_tokens", "steps", "temperature", "top_p", "top_k", "alg", "alg_temp",
                "eps", "threshold", "block_length", "dual_cache", "prompt", "attention_mask",
                "rows"}
LOGITS_RTOL = 1e-4


class RecordingModel:
    """Wraps the model: records every forward's input length and the first `keep` (ids, logits)."""

    def __init__(self, model, keep: int = 3):
        self.model, self.keep = model, keep
        self.lengths: list[int] = []
        self.dumps: list[tuple[Tensor, Tensor]] = []

    def __call__(self, input_ids, *args, **kwargs):
        out = self.model(input_ids, *args, **kwargs)
        self.lengths.append(int(input_ids.shape[1]))
        if len(self.dumps) < self.keep:
            self.dumps.append((input_ids.clone(), out.clone()))
        return out


def case_inputs(case: dict, T: dict[str, Tensor]):
    """-> (prompt (B, Lp), attention_mask or None, SamplingParams, cache mode)."""
    kw = case["kwargs"]
    unknown = set(kw) - KNOWN_KWARGS
    if unknown:
        raise ValueError(f"case {case['name']}: unknown kwargs {sorted(unknown)}")
    prompt = T[kw["prompt"]]
    if "rows" in kw:                                   # the official call sliced prompt[a:b]
        prompt = prompt[kw["rows"][0]:kw["rows"][1]]
    mask = T[kw["attention_mask"]] if kw.get("attention_mask") else None
    alg, threshold = kw.get("alg", "origin"), kw.get("threshold")
    if alg == "confidence_threshold":                  # Fast-dLLM: token-probability confidence
        alg, threshold = "maskgit_plus", threshold if threshold is not None else 0.9
    elif case["kind"] == "fastdllm_dream":
        threshold = None                               # only read by the confidence_threshold alg
    params = SamplingParams(max_tokens=kw["max_new_tokens"], steps=kw["steps"],
                            temperature=kw.get("temperature", 0.0), top_p=kw.get("top_p"),
                            top_k=kw.get("top_k"), alg=alg, alg_temp=kw.get("alg_temp"),
                            eps=kw.get("eps", 1e-3), threshold=threshold,
                            block_length=kw.get("block_length"))
    cache = None
    if case["kind"] == "fastdllm_dream" and kw.get("block_length") is not None:
        cache = "dual" if kw.get("dual_cache") else "prefix"
    return prompt, mask, params, cache


def run_dream_case(case: dict, T: dict[str, Tensor], loaded) -> None:
    """Run one manifest case of a Dream kind on `loaded` (LoadedModel) and assert it matches."""
    if case["kind"] not in DREAM_KINDS:
        raise ValueError(f"case {case['name']}: kind {case['kind']!r} is not one of {DREAM_KINDS}")
    prompt, mask, params, cache = case_inputs(case, T)
    model = RecordingModel(loaded.model)
    history: list[Tensor] = []
    if case.get("seed") is not None:
        torch.manual_seed(case["seed"])
    x, nfe = dream_generate(model, prompt, params, spec=loaded.spec, attention_mask=mask,
                            cache=cache, history=history)
    name, outputs = case["name"], case["outputs"]
    want = T[outputs["sequences"]]
    assert torch.equal(x, want), f"{name}: sequences differ at {(x != want).nonzero().tolist()[:8]}"
    if outputs.get("history"):
        got = torch.stack(history).to(torch.int32)
        ref = T[outputs["history"]]
        assert got.shape == ref.shape, f"{name}: history {tuple(got.shape)} != {tuple(ref.shape)}"
        bad = (got != ref).any(-1).any(-1).nonzero().flatten().tolist()
        assert not bad, f"{name}: history differs first at step {bad[:1]}"
    assert nfe == case["nfe"], f"{name}: nfe {nfe} != {case['nfe']}"
    if case.get("forward_input_lengths"):
        assert model.lengths == case["forward_input_lengths"], f"{name}: forward input lengths"
    check_dumps(case, T, model)


def check_dumps(case: dict, T: dict[str, Tensor], model: RecordingModel) -> None:
    """Per-forward dumps of cached runs: the same inputs, raw logits within 1e-4 relative error."""
    dumps = case.get("per_forward_dumps") or {}
    for name in sorted(dumps, key=lambda n: int(n.removeprefix("forward"))):
        k, ids_key, logits_desc = int(name.removeprefix("forward")), *dumps[name].values()
        ids, logits = model.dumps[k]
        assert torch.equal(ids, T[ids_key]), f"{case['name']}: forward {k} input ids differ"
        ref = T[logits_desc.split()[0]]
        err = ((logits - ref).abs().max() / ref.abs().max()).item()
        assert err < LOGITS_RTOL, f"{case['name']}: forward {k} logits rel. error {err:.2e}"
