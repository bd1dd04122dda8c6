"""Load a Hugging Face checkpoint folder (or hub id) into a native model, by official names.

`config.json` picks the architecture (registry.py); `*.safetensors` (single file, or shards
listed in `model.safetensors.index.json`) fill it. The model is built on the meta device and the
tensors are assigned straight into the target dtype/device, so an 8B model never exists twice in
memory. A missing tensor, an unexpected one or a wrong shape is an error naming the tensor.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .registry import architecture_for
from .spec import ModelSpec

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>")        # LLaDA-Instruct, Dream-Instruct end-of-turn


@dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: ModelSpec
    tokenizer: Any                                # transformers tokenizer, or None (bare checkpoints)
    generation_defaults: dict = field(default_factory=dict)   # generation_config.json
    path: Optional[Path] = None
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is invalid: CUDA is not available here; use 'cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r} is invalid: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":   # bf16 on GPUs (what the 8B models were trained in); float32 on CPU (exact, fast)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def resolve_model_dir(source: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub where a network exists."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        raise FileNotFoundError(f"model={text!r}: no such checkpoint folder (and it is not a hub id "
                                "of the form 'org/name')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                            "*.model", "*.jinja"]))
    except Exception as exc:  # network, auth or missing repo: say which model and why
        raise FileNotFoundError(f"model={text!r}: not a local folder, and downloading it from the "
                                f"model hub failed ({type(exc).__name__}: {exc}). Download it where a "
                                "network exists and pass the folder instead.") from exc


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.name} is missing from checkpoint folder {path.parent}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def load_tokenizer(folder: Path):
    """The checkpoint's own tokenizer and chat template, or None when the folder has none."""
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    config = folder / "tokenizer_config.json"
    if config.exists() and read_json(config).get("tokenizer_class") == "PreTrainedTokenizerFast":
        # the folder's tokenizer.json as written: for a known model_type (qwen2) AutoTokenizer
        # substitutes that model's class and rebuilds the pipeline, which splits the project's
        # tiny-ar vocabulary differently from its tiny-llada drafter
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    # trust_remote_code=False: a real LLaDA folder names hub code in config.json `auto_map`, and
    # transformers would otherwise stop to ask on stdin; we never run that code
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def tokenizer_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    ids = {"bos_token_id": tokenizer.bos_token_id}
    vocab = tokenizer.get_vocab()
    # the end-of-turn token is the one the chat template writes: a vocabulary may hold both
    # families' (the project's tiny models share one), and only the template tells them apart
    template = getattr(tokenizer, "chat_template", None) or ""
    found = [t for t in EOT_TOKENS if t in vocab]
    for tok in [t for t in found if t in template] + found:
        ids["eot_token_id"] = vocab[tok]
        break
    return ids


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index)["weight_map"].values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{index.name} lists shard(s) missing from {folder}: {missing}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != "fixtures.safetensors"]
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint folder {folder}")
    return files


def load_weights(model: torch.nn.Module, files: list[Path], dtype: torch.dtype,
                 device: torch.device) -> None:
    """Assign every checkpoint tensor to its parameter; fail naming any mismatch."""
    expected = dict(model.state_dict())
    ignored = set(getattr(model, "ignored_checkpoint_tensors", ()))   # e.g. a tied lm_head copy
    seen: set[str] = set()
    for f in tqdm(files, desc="loading shards", unit="shard", disable=len(files) < 2):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq") or name in ignored:
                        continue  # some exports save RoPE buffers; we compute them
                    raise ValueError(f"checkpoint tensor {name!r} (in {f.name}) is not a parameter "
                                     f"of {type(model).__name__}: wrong architecture or corrupt file")
                t = st.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(t.shape) != want:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, "
                                     f"expected {want} from config.json")
                set_tensor(model, name, t.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")


def set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))


def load_model(model: str | os.PathLike, dtype: str | torch.dtype = "auto",
               device: str = "auto") -> LoadedModel:
    """Folder or hub id -> LoadedModel(model in eval mode, spec, tokenizer, generation defaults)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    folder = resolve_model_dir(model)
    cfg = read_json(folder / "config.json")
    arch = architecture_for(cfg, where=str(folder / "config.json"))
    tokenizer = load_tokenizer(folder)
    spec, tied = arch.spec_from_config(cfg, tokenizer_ids(tokenizer))
    with torch.device("meta"):
        net = arch.model_cls(spec, tied)
    load_weights(net, shard_files(folder), dt, dev)
    gen_cfg = folder / "generation_config.json"
    defaults = read_json(gen_cfg) if gen_cfg.exists() else {}
    log.info("loaded %s (%s, %d layers, %s on %s) from %s", folder.name, spec.arch,
             spec.num_layers, dt, dev, folder)
    return LoadedModel(net.eval(), spec, tokenizer, defaults, folder, str(model))
