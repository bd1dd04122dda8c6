"""The `sdar` family of the trainer: the two-stream block-diffusion mask (who sees whom), its
forward equals decoding block by block, the noise never touches the prompt, a few steps lower the
loss on a fixed batch, and the written folder loads with the project's loader and decodes with
SDAR's reference loop."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import dfastllm_ray
from dfastllm_ray.models.loader import load_model
from dfastllm_ray.models.sdar import SDARForCausalLM, spec_from_config
from dfastllm_ray.sampling.sdar_generate import BlockDiffusionParams, block_diffusion_generate
from dfastllm_ray.train import tasks
from dfastllm_ray.train.block_loss import (block_diffusion_loss, block_noise,
                                           crop_to_answer_blocks, two_stream_mask)
from dfastllm_ray.train.evaluate import evaluate, prompt_ids
from dfastllm_ray.train.trainer import Run, TrainConfig, train
from dfastllm_ray.train.transplant import llada_to_sdar

LLADA = Path(dfastllm_ray.__file__).parent / "assets" / "tiny-llada"
TINY = dict(family="sdar", steps=3, batch_size=8, warmup=1, d_model=32, n_layers=1, n_heads=2,
            n_kv_heads=1, mlp_hidden=64, gen_min=4, gen_max=12, save_every_s=1e9)


def test_two_stream_mask_on_a_small_example():
    # L = 5, blocks of 2: block ids 0 0 1 1 2; noisy stream = rows/cols 0..4, clean = 5..9
    m = two_stream_mask(5, 2)
    assert m.shape == (10, 10) and m.dtype == torch.bool
    sees = {q: set(torch.nonzero(m[q]).flatten().tolist()) for q in range(10)}
    assert sees[0] == sees[1] == {0, 1}                  # noisy block 0: itself, no clean key
    assert sees[2] == sees[3] == {2, 3, 5, 6}            # noisy block 1 + clean block 0
    assert sees[4] == {4, 5, 6, 7, 8}                    # noisy block 2 + clean blocks 0, 1
    assert sees[5] == sees[6] == {5, 6}                  # clean block 0: block-causal
    assert sees[7] == sees[8] == {5, 6, 7, 8}
    assert sees[9] == {5, 6, 7, 8, 9}                    # never a noisy key from the clean side


def test_two_stream_forward_equals_decoding_block_by_block():
    """The noisy stream's logits of block b == a plain forward over clean blocks < b followed by
    the noisy block b (what the reference loop computes against its cache)."""
    cfg = {"vocab_size": 20, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 64, "block_size": 2,
           "mask_token_id": 19, "rope_theta": 10000.0}
    torch.manual_seed(0)
    model = SDARForCausalLM(*spec_from_config(cfg, {}))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    length = 7
    x = torch.randint(0, 19, (1, length))
    noisy = x.clone()
    noisy[0, [2, 4, 5]] = 19
    ids, pos = torch.cat([noisy, x], 1), torch.arange(length).repeat(2)[None]
    out = model(ids, positions=pos, attn_bias=two_stream_mask(length, 2)[None, None])[:, :length]
    for start in range(0, length, 2):
        end = min(start + 2, length)
        ref = model(torch.cat([x[:, :start], noisy[:, start:end]], 1))[:, start:end]
        torch.testing.assert_close(out[:, start:end], ref, atol=1e-5, rtol=1e-5)


def test_block_noise_masks_generation_only_with_one_level_per_block():
    gen = torch.zeros(64, 10, dtype=torch.bool)
    gen[:, 3:] = True                                    # 3 prompt positions
    masked, t = block_noise(gen, 4, 1e-3, torch.Generator().manual_seed(0))
    assert not masked[:, :3].any() and masked.any()
    blocks = t[:, :8].reshape(64, 2, 4)                 # blocks 0, 1 (block 2: positions 8, 9)
    assert (blocks == blocks[..., :1]).all()            # one t per (row, block)
    assert (t[:, 8:] == t[:, 8:9]).all() and not torch.equal(t[:, 0], t[:, 4])
    assert ((t > 1e-3 - 1e-9) & (t <= 1)).all()


def test_rows_are_cut_after_the_block_holding_the_eot():
    # row 0: prompt 0..2, answer 3..4, EOT 5 -> its block [4, 8) ends at 8; row 1: EOT at 9
    ans = torch.zeros(2, 14, dtype=torch.bool)
    ans[0, 3:6], ans[1, 3:10] = True, True
    gen = torch.zeros(2, 14, dtype=torch.bool)
    gen[:, 3:] = True
    x = torch.arange(28).view(2, 14)
    x2, gen2 = crop_to_answer_blocks(x, gen, ans, 4)
    assert torch.equal(x2, x[:, :12])                    # row 1's EOT block ends at 12
    assert gen2[0].nonzero().flatten().tolist() == list(range(3, 8))
    assert gen2[1].nonzero().flatten().tolist() == list(range(3, 12))


def test_training_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    run = Run(TrainConfig(out=str(tmp_path / "out"), state_dir=str(tmp_path / "s"), **TINY))
    groups = run.batcher([next(run.data) for _ in range(8)])
    opt = torch.optim.AdamW(run.model.parameters(), lr=3e-3)

    def loss(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        parts = [block_diffusion_loss(run.model, x, gen, ans, run.ids["mask"], 4, 1e-3, g)
                 for x, gen, ans in groups]
        return sum(n for n, _ in parts) / sum(d for _, d in parts)

    with torch.no_grad():
        before = loss(123).item()
    for step in range(25):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        after = loss(123).item()
    assert after < 0.7 * before, (before, after)


def test_saved_folder_loads_and_decodes(tmp_path):
    out = tmp_path / "tiny-sdar"
    summary = train(TrainConfig(out=str(out), state_dir=str(tmp_path / "s"), **TINY))
    assert summary["step"] == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["SDARForCausalLM"] and cfg["model_type"] == "sdar"
    assert cfg["block_size"] == 4 and "auto_map" not in cfg and not cfg["attention_bias"]
    for f in ("tokenizer.json", "tokenizer_config.json"):   # tiny-llada's ids and template
        assert (out / f).read_text() == (LLADA / f).read_text()
    loaded = load_model(out, dtype="float32", device="cpu")
    spec, tok = loaded.spec, loaded.tokenizer
    assert isinstance(loaded.model, SDARForCausalLM) and spec.block_size == 4
    assert spec.mask_token_id == cfg["mask_token_id"] == tok.convert_tokens_to_ids("<|mdm_mask|>")
    assert spec.eot_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert "model.layers.0.self_attn.q_norm.weight" in loaded.model.state_dict()
    prompt = torch.tensor([prompt_ids(tok, "add 12+34")])
    params = BlockDiffusionParams(gen_length=8, block_length=4, denoising_steps=4, top_k=1)
    res = block_diffusion_generate(loaded.model, prompt, params, spec)
    assert torch.equal(res.x[:, :prompt.shape[1]], prompt)
    assert res.x.shape[1] % 4 == 0 and res.nfe >= 2
    acc = evaluate(loaded.model, tok, tasks.heldout_set(1), 8, 4, spec.mask_token_id,
                   set(spec.stop_token_ids), block_strategy="sequential")
    assert set(acc) == set(tasks.TASKS) | {"mean"}


def test_llada_transplant_has_exactly_sdar_names_and_unit_qk_norms():
    llada = load_file(str(LLADA / "model.safetensors"))
    state = llada_to_sdar(llada, n_heads=4, n_kv_heads=4)
    cfg = json.loads((LLADA.parent / "tiny-sdar" / "config.json").read_text())
    model = SDARForCausalLM(*spec_from_config(cfg, {}))
    model.load_state_dict(state, strict=True)            # no bias, every q/k norm present
    assert torch.equal(state["model.layers.0.self_attn.q_norm.weight"], torch.ones(32))
    assert torch.equal(state["model.layers.3.mlp.down_proj.weight"],
                       llada["model.transformer.blocks.3.ff_out.weight"])


def test_shipped_tiny_sdar_answers_heldout_questions():
    """The shipped folder (docs/tiny_model.md: 99.0% on 100 per task, both strategies) loads by
    the SDAR path with tiny-llada's tokenizer and answers 10 held-out questions per task."""
    folder = LLADA.parent / "tiny-sdar"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).read_text() == (LLADA / f).read_text()
    loaded = load_model(folder, dtype="float32", device="cpu")
    spec = loaded.spec
    assert spec.arch == "sdar" and spec.block_size == 4 and not spec.logits_shift
    acc = evaluate(loaded.model, loaded.tokenizer, tasks.heldout_set(10), 32, 4,
                   spec.mask_token_id, set(spec.stop_token_ids),
                   block_strategy="low_confidence_dynamic")
    assert acc["mean"] >= 0.9 and min(acc[t] for t in tasks.TASKS) >= 0.7, acc
