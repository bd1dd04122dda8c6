"""Runner for the LLaDA generation fixtures: kinds "llada_generate" (ML-GSAI `generate`) and
"fastdllm_llada" (Fast-dLLM v1 `generate`, `generate_with_prefix_cache`, `generate_with_dual_cache`).

A case is re-run through `dfastllm_ray.sampling.llada_generate.llada_generate` with the manifest's
kwargs and seed (`torch.manual_seed(seed)` right before the call, the global RNG drawn in the
official order). Checked: the sequences token for token, NFE, and whatever else the case
recorded -- the per-forward input trace, the per-forward input lengths, the dumped logits of
the first forwards (cached forwards included), and the masks left in the output.
"""
from __future__ import annotations

import torch

from dfastllm_ray.models.loader import LoadedModel
from dfastllm_ray.sampling.llada_generate import llada_generate
from dfastllm_ray.sampling.params import SamplingParams
from reference_harness import assert_close_logits

# source.function of a "fastdllm_llada" case -> llada_generate variant
FASTDLLM_VARIANTS = {
    "generate": "fastdllm",
    "generate_with_prefix_cache": "fastdllm_prefix",
    "generate_with_dual_cache": "fastdllm_dual",
}
# official keyword -> SamplingParams field
PARAM_NAMES = {"gen_length": "max_tokens", "steps": "steps", "block_length": "block_length",
               "temperature": "temperature", "remasking": "remasking", "cfg_scale": "cfg_scale",
               "threshold": "threshold", "factor": "factor", "logits_eos_inf": "logits_eos_inf",
               "confidence_eos_eot_inf": "confidence_eos_eot_inf"}
INPUT_NAMES = {"prompt", "rows", "attention_mask", "mask_id"}


class Recorder:
    """Wraps the model; keeps each forward's input ids and logits (for traces and dumps)."""

    def __init__(self, model):
        self.model, self.inputs, self.logits = model, [], []

    def __call__(self, input_ids, **kwargs):
        out = self.model(input_ids, **kwargs)
        self.inputs.append(input_ids.clone())
        self.logits.append(out)
        return out


def variant_of(case: dict) -> str:
    if case["kind"] == "llada_generate":
        return "llada"
    fn = case["source"]["function"]
    assert fn in FASTDLLM_VARIANTS, f"{case['name']}: unknown Fast-dLLM function {fn!r}"
    return FASTDLLM_VARIANTS[fn]


def call_of(case: dict, T: dict, spec) -> tuple[torch.Tensor, SamplingParams, torch.Tensor | None]:
    """The case's kwargs -> (prompt (B, Lp), SamplingParams, attention_mask or None)."""
    kw = case["kwargs"]
    unknown = set(kw) - set(PARAM_NAMES) - INPUT_NAMES
    assert not unknown, f"{case['name']}: kwargs {sorted(unknown)} are not understood by this runner"
    assert kw["mask_id"] == spec.mask_token_id, (
        f"{case['name']}: mask_id {kw['mask_id']} != the checkpoint's {spec.mask_token_id}")
    lo, hi = kw.get("rows") or (0, None)
    prompt = T[kw["prompt"]][lo:hi]
    mask = T[kw["attention_mask"]][lo:hi] if kw.get("attention_mask") else None
    params = SamplingParams(**{PARAM_NAMES[k]: v for k, v in kw.items()
                               if k in PARAM_NAMES and v is not None})
    return prompt, params, mask


def run_llada_case(case: dict, T: dict, loaded: LoadedModel) -> None:
    name = case["name"]
    prompt, params, mask = call_of(case, T, loaded.spec)
    rec = Recorder(loaded.model)
    if case.get("seed") is not None:
        torch.manual_seed(case["seed"])
    x, nfe = llada_generate(rec, prompt, params, spec=loaded.spec, variant=variant_of(case),
                            attention_mask=mask)
    expected = T[case["outputs"]["sequences"]]
    assert nfe == case["nfe"], f"{name}: NFE {nfe} != reference {case['nfe']}"
    bad = (x != expected).nonzero().tolist()
    assert not bad, f"{name}: {len(bad)} token(s) differ, first (row, pos) {bad[:5]}"
    check_records(case, T, rec, loaded.spec.mask_token_id, x)


def check_records(case: dict, T: dict, rec: Recorder, mask_id: int, x: torch.Tensor) -> None:
    name = case["name"]
    trace = case["outputs"].get("trace")
    if trace is not None:
        ref = T[trace].long()                                  # (nfe, B or 2B for CFG, L)
        ours = torch.stack(rec.inputs)
        assert ours.shape == ref.shape, f"{name}: trace shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        steps = (ours != ref).flatten(1).any(1).nonzero().flatten().tolist()
        assert not steps, f"{name}: forward inputs differ from the trace at forwards {steps}"
    if case.get("forward_input_lengths") is not None:
        lengths = [int(i.shape[1]) for i in rec.inputs]
        assert lengths == case["forward_input_lengths"], f"{name}: forward lengths {lengths}"
    for key, dump in sorted((case.get("per_forward_dumps") or {}).items()):
        k = int(key.removeprefix("forward"))
        assert torch.equal(rec.inputs[k], T[dump["input_ids"]]), f"{name}: {key} input ids differ"
        assert_close_logits(rec.logits[k], T[dump["logits"]], f"{name}:{key}")
    if case.get("masks_left_in_output") is not None:
        left = int((x == mask_id).sum())
        assert left == case["masks_left_in_output"], f"{name}: {left} masks left in the output"
