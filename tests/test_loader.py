"""Checkpoint loading: sharded folders, dtypes, and the errors a corrupt checkpoint must give."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfastllm_ray.models.loader import load_model
from dfastllm_ray.models.registry import supported

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors")


def copy_checkpoint(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in CHECKPOINT_FILES:
        shutil.copy(FIXTURES / name / f, dest / f)
    return dest


def logits_of(folder: Path, dtype: str = "float32") -> torch.Tensor:
    lm = load_model(folder, dtype=dtype, device="cpu")
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        return lm.model(ids).float()


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_sharded_checkpoint_equals_single_file(name, tmp_path):
    single = copy_checkpoint(name, tmp_path / "single")
    sharded = copy_checkpoint(name, tmp_path / "sharded")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fname))
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits_of(single), logits_of(sharded))


def test_bfloat16_weights_load_and_cast(tmp_path):
    folder = copy_checkpoint("llada-tiny", tmp_path / "bf16")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, str(folder / "model.safetensors"))
    lm = load_model(folder, dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16
    params = dict(lm.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in tensors.items())
    up = load_model(folder, dtype="float32", device="cpu")        # bf16 on disk, float32 in memory
    assert all(torch.equal(p, tensors[n].float()) for n, p in up.model.named_parameters())
    with torch.no_grad():
        out = lm.model(torch.arange(3, 19)[None])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_missing_tensor_is_named(tmp_path):
    folder = copy_checkpoint("llada-tiny", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*blocks\.1\.up_proj\.weight"):
        load_model(folder, dtype="float32", device="cpu")


def test_wrong_shape_is_named(tmp_path):
    folder = copy_checkpoint("dream-tiny", tmp_path / "s")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(7)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.bias' has shape \(7,\), "
                                         r"expected \(32,\)"):
        load_model(folder, dtype="float32", device="cpu")


def test_unexpected_tensor_is_named(tmp_path):
    folder = copy_checkpoint("llada-tiny", tmp_path / "u")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.transformer.blocks.9.q_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.9\.q_proj\.weight.*not a parameter"):
        load_model(folder, dtype="float32", device="cpu")


def test_unknown_architecture_lists_supported(tmp_path):
    folder = copy_checkpoint("llada-tiny", tmp_path / "a")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type='llama'.*not a supported diffusion LM. "
                                         r"Supported: .*LLaDAModelLM.*"):
        load_model(folder, dtype="float32", device="cpu")
    assert "DreamModel" in supported() and "llada" in supported()


def test_missing_folder_and_offline_hub_id_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model='no-such-org/no-such-model': not a local folder"):
        load_model("no-such-org/no-such-model", device="cpu")


@pytest.mark.parametrize("field,value,match", [
    ("dtype", "float8", r"dtype='float8' is invalid"),
    ("device", "tpu", r"device='tpu' is invalid"),
])
def test_bad_dtype_or_device(field, value, match):
    with pytest.raises(ValueError, match=match):
        load_model(FIXTURES / "llada-tiny", **{field: value})


def test_config_naming_hub_code_loads_natively(tmp_path):
    """Real LLaDA folders name their modeling code in `auto_map`; the folder still loads through
    our own model and tokenizer path. (The loader also passes trust_remote_code=False so that
    transformers never stops to ask; that prompt does not appear without a terminal, so this test
    cannot observe it.)"""
    import dfastllm_ray
    asset = Path(dfastllm_ray.__file__).parent / "assets" / "tiny-llada"
    folder = tmp_path / "auto_map"
    shutil.copytree(asset, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_llada.LLaDAConfig",
                       "AutoModel": "modeling_llada.LLaDAModelLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load_model(folder, dtype="float32", device="cpu")
    assert lm.tokenizer is not None and lm.spec.arch == "llada"
