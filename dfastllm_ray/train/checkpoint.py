"""What a training run writes: the model folder (what ships) and the resume state (what does not).

The model folder holds config.json, generation_config.json, model.safetensors, the tokenizer
files and training_args.json. The resume state (`<state_dir>/state.pt`) holds everything the next
step depends on: weights, AdamW moments, the LR schedule's position, every random stream (data,
masking, lengths) and the step counter, so a resumed run makes bit-for-bit the same steps as an
uninterrupted one (same thread count). Writes go to a temporary file first and are renamed, so an
interrupted write never leaves a torn checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save, save_file

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Fields a resumed run may change: they decide when to write and evaluate, never what a step does.
RESUMABLE_CHANGES = ("out", "device", "resume", "state_dir", "stop_at", "save_every_s",
                     "eval_every", "eval_per_task", "log_every")


def weights_bytes(model: torch.nn.Module, save_dtype: str) -> bytes:
    tensors = {k: v.detach().to("cpu", SAVE_DTYPES[save_dtype]).contiguous()
               for k, v in model.state_dict().items()}
    return save(tensors, metadata={"format": "pt"})


def weights_sha256(model: torch.nn.Module, save_dtype: str) -> str:
    """The reproducibility fingerprint: sha256 of the model.safetensors this model would write."""
    return hashlib.sha256(weights_bytes(model, save_dtype)).hexdigest()


def save_folder(model: torch.nn.Module, config: dict, ids: dict[str, int], cfg) -> str:
    """Write the model files into cfg.out (the tokenizer is already there); return the sha256
    of model.safetensors."""
    out = Path(cfg.out)
    data = weights_bytes(model, cfg.save_dtype)
    _atomic_write(out / "model.safetensors", data)
    write_json(out / "config.json", config)
    gen = {"_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
           "pad_token_id": ids["eos"], "max_new_tokens": 32}
    if cfg.family != "ar":
        gen["mask_token_id"] = ids["mask"]
    if cfg.family == "dream":
        # Dream-v0-Instruct's documented setting (its README's `diffusion_generate` call). The
        # code's default `origin` unmasks in random order: with greedy tokens the tiny twin then
        # commits EOS first and replies "" without a KV cache (measured: 0 of 16 right; entropy
        # 14 of 16)
        gen["alg"] = "entropy"
    write_json(out / "generation_config.json", gen)
    args = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    args["init_from"] = Path(cfg.init_from).name if cfg.init_from else ""   # no machine paths
    write_json(out / "training_args.json", args)
    return hashlib.sha256(data).hexdigest()


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, cfg) -> dict:
    """The saved state, after checking that the run it continues had the same recipe."""
    if not path.exists():
        raise FileNotFoundError(f"resume=True but {path} does not exist: run once without "
                                "--resume, or pass the --state-dir of an earlier run")
    state = torch.load(path, weights_only=False)
    saved, now = state["config"], asdict(cfg)
    defaults = {f.name: f.default for f in fields(cfg)}
    for k, v in now.items():   # a field newer than the saved run counts as its default
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v:
            raise ValueError(f"{k}={v!r} differs from the run being resumed ({saved.get(k)!r}): "
                             f"resume with the same value, or start a new --state-dir")
    return state


def write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
