"""The LLaDA reference loop beyond the fixtures: padding, empty steps, batch == single, errors.

The fixture cases themselves run in tests/test_reference.py. These use the tiny LLaDA checkpoint
in the project's copy of the fixtures (float32, CPU).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dfastllm_ray.sampling.llada_generate import VARIANTS, llada_generate
from dfastllm_ray.sampling.params import SamplingParams
from reference_harness import DEFAULT_ROOT, load_fixture
from reference_llada import Recorder

MASK = 510


@pytest.fixture(scope="module")
def fx():
    return load_fixture(DEFAULT_ROOT / "llada-tiny")


def run(fx, model, prompt, params, variant="llada", mask=None):
    return llada_generate(model or fx.loaded.model, prompt, params, spec=fx.loaded.spec,
                          variant=variant, attention_mask=mask)


def padded_inputs(fx):
    T = fx.tensors
    return T["gen.prompt_padded"], T["gen.attention_mask_padded"]


def test_padded_rows_keep_absolute_positions_and_mask_pad_keys_only(fx):
    """ML-GSAI keeps RoPE positions 0..L-1 in every row (pads are not skipped) and masks padded
    keys with finfo.min; padded query rows are still computed."""
    prompt, mask = padded_inputs(fx)
    seen = []

    def model(ids, **kw):
        seen.append(kw)
        return fx.loaded.model(ids, **kw)

    run(fx, model, prompt, SamplingParams(max_tokens=8, steps=2, block_length=8), mask=mask)
    pads = (mask == 0)
    for kw in seen:
        assert kw.get("positions") is None                 # the model's default: absolute 0..L-1
        bias = kw["attn_bias"]                             # (B, 1, 1, L)
        assert bias.shape == (2, 1, 1, prompt.shape[1] + 8)
        assert torch.equal(bias[:, 0, 0, :prompt.shape[1]] < 0, pads)
        assert (bias[:, 0, 0, prompt.shape[1]:] == 0).all()


def test_pad_count_changes_logits_only_by_rounding_here(fx):
    """The documented consequence: a left-padded row sits at shifted absolute positions, so its
    numbers differ from the same prompt run alone -- by float rounding only (RoPE is relative).
    On this checkpoint in float32 the tokens agree; near-ties may not in bfloat16."""
    prompt, mask = padded_inputs(fx)
    pads = int((mask[1] == 0).sum())
    params = SamplingParams(max_tokens=32, steps=32, block_length=8)
    batch, _ = run(fx, None, prompt, params, mask=mask)
    alone, _ = run(fx, None, prompt[1:, pads:], params)
    assert torch.equal(batch[1, pads:], alone[0])
    padded_rec, alone_rec = Recorder(fx.loaded.model), Recorder(fx.loaded.model)
    run(fx, padded_rec, prompt, replace(params, steps=4), mask=mask)
    run(fx, alone_rec, prompt[1:, pads:], replace(params, steps=4))
    a, b = padded_rec.logits[0][1, pads:], alone_rec.logits[0][0]
    assert 0 < float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_empty_schedule_steps_still_cost_a_forward(fx):
    """steps per block > block_length: the official schedule gives later steps 0 tokens, and
    those forwards commit nothing (NFE = steps)."""
    prompt = fx.tensors["gen.prompt"][:1]
    x, nfe = run(fx, None, prompt, SamplingParams(max_tokens=8, steps=12, block_length=8))
    assert nfe == 12 and not (x == MASK).any()
    ref, _ = run(fx, None, prompt, SamplingParams(max_tokens=8, steps=8, block_length=8))
    assert torch.equal(x, ref)                   # the same 8 commits, 4 empty forwards after them


@pytest.mark.parametrize("variant", ["fastdllm", "fastdllm_prefix", "fastdllm_dual"])
def test_each_row_alone_gives_the_batch_row(fx, variant):
    """Fast-dLLM's early exit is batch-wide, so NFE depends on the batch but tokens do not: a
    finished row has no candidates and is left alone."""
    prompt = fx.tensors["gen.prompt"]
    params = SamplingParams(max_tokens=16, steps=8, block_length=8, threshold=0.9)
    batch, _ = run(fx, None, prompt, params, variant)
    for row in range(prompt.shape[0]):
        alone, _ = run(fx, None, prompt[row:row + 1], params, variant)
        assert torch.equal(batch[row], alone[0])


@pytest.mark.parametrize("kwargs,variant,message", [
    (dict(cfg_scale=1.0), "fastdllm_dual", "cfg_scale"),
    (dict(alg="entropy"), "llada", "alg"),
    (dict(), "nope", "variant"),
])
def test_invalid_settings_name_the_field(fx, kwargs, variant, message):
    params = SamplingParams(max_tokens=8, steps=8, block_length=8, **kwargs)
    with pytest.raises(ValueError, match=message):
        run(fx, None, fx.tensors["gen.prompt"], params, variant)


def test_fastdllm_refuses_an_attention_mask(fx):
    prompt, mask = padded_inputs(fx)
    with pytest.raises(ValueError, match="attention_mask"):
        run(fx, None, prompt, SamplingParams(max_tokens=8, steps=8, block_length=8), "fastdllm", mask)


def test_variants_are_the_four_official_functions():
    assert sorted(VARIANTS) == ["fastdllm", "fastdllm_dual", "fastdllm_prefix", "llada"]
