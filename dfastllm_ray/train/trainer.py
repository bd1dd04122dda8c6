"""Train a tiny LLaDA on the task suite with LLaDA's masked-diffusion SFT objective.

Each training row is `chat prompt + answer + <|eot_id|> + <|endoftext|> ...` up to the batch's
canvas length, as in LLaDA-Instruct SFT: the model learns to fill the tail of a generation with
EOS, which lets the engine exit early. The row's generation positions (answer, EOT, EOS padding)
are masked independently with probability t ~ U(eps, 1] per row; the loss is the cross-entropy on
masked positions weighted 1/t (LLaDA paper Eq. 5), self-normalised over the batch (see
`diffusion_loss`). The prompt is never masked and never scored.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..models.llada import LLaDAModel, spec_from_config
from . import tasks
from .tokenizer import save_tokenizer

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    out: str                      # checkpoint folder to write (created)
    seed: int = 0                 # model init, data stream and masking all derive from it
    steps: int = 4000             # optimizer steps
    batch_size: int = 64          # rows per step, tasks mixed round-robin
    lr: float = 1e-3              # peak AdamW learning rate
    min_lr_ratio: float = 0.1     # cosine floor as a fraction of lr
    warmup: int = 200             # linear warmup steps
    weight_decay: float = 0.1     # on matrices only (not norms)
    grad_clip: float = 1.0        # global grad-norm clip
    d_model: int = 192            # hidden size
    n_layers: int = 4
    n_heads: int = 6              # head_dim = d_model / n_heads
    mlp_hidden: int = 512         # SwiGLU width
    rope_theta: float = 10000.0   # LLaDA-8B uses 5e5 for 4k contexts; short canvases need faster
                                  # rotations to tell neighbouring positions apart
    gen_min: int = 16             # generation positions per row: at least this many ...
    gen_max: int = 32             # ... at most this many beyond the batch's longest prompt
    eps: float = 1e-3             # smallest mask ratio t
    max_seq: int = 256            # context length written to config.json
    threads: int = 2              # torch CPU threads (fixed: the result depends on it)
    save_dtype: str = "float32"   # dtype of model.safetensors
    device: str = "cpu"
    init_from: str = ""           # a checkpoint folder of the same shape to continue from ("": random init)


def model_config(cfg: TrainConfig, ids: dict[str, int]) -> dict:
    """config.json in the official LLaDAConfig format (the fields LLaDA-8B's file has), minus
    `auto_map`: no remote modeling code ships with this folder, and naming some would make
    transformers ask whether to trust it."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": cfg.d_model, "embedding_dropout": 0.0, "embedding_size": ids["vocab_size"],
        "eos_token_id": ids["eos"], "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": ids["mask"], "max_sequence_length": cfg.max_seq,
        "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads,
        "n_layers": cfg.n_layers, "pad_token_id": ids["eos"], "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True,
        "rope_theta": cfg.rope_theta, "scale_logits": False, "torch_dtype": cfg.save_dtype,
        "use_cache": False, "vocab_size": ids["vocab_size"], "weight_tying": False,
    }


def build_model(config: dict, ids: dict[str, int], seed: int) -> LLaDAModel:
    """The project's own LLaDAModel from config.json, initialised N(0, 0.02) (residual outputs
    scaled by 1/sqrt(2 * n_layers), GPT-2 style) from `seed`."""
    spec, tied = spec_from_config(config, {"bos_token_id": ids["bos"], "eot_token_id": ids["eot"]})
    model = LLaDAModel(spec, tied)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue                                           # RMSNorm weights stay 1
        residual = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
        std = 0.02 / math.sqrt(2 * spec.num_layers) if residual else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


class Batcher:
    """Examples -> (input_ids (B, T) int64, gen (B, T) bool: the scored generation positions)."""

    def __init__(self, tokenizer, ids: dict[str, int], cfg: TrainConfig):
        self.tok, self.ids, self.cfg = tokenizer, ids, cfg
        self.rng = random.Random(f"lengths:{cfg.seed}")

    def prompt_ids(self, prompt: str) -> list[int]:
        out = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def __call__(self, examples: list[tasks.Example]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [self.prompt_ids(e.prompt) for e in examples]
        answers = [self.tok.encode(e.answer, add_special_tokens=False) + [self.ids["eot"]]
                   for e in examples]
        gen_len = self.rng.randint(self.cfg.gen_min, self.cfg.gen_max)
        width = max(len(p) for p in prompts) + gen_len
        rows, gen = [], torch.zeros(len(examples), width, dtype=torch.bool)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            if len(a) > width - len(p):
                raise ValueError(f"answer of {examples[i]} needs {len(a)} positions; "
                                 f"gen_min={self.cfg.gen_min} is too small")
            rows.append(p + a + [self.ids["eos"]] * (width - len(p) - len(a)))
            gen[i, len(p):] = True
        return torch.tensor(rows), gen


def diffusion_loss(model: torch.nn.Module, x: torch.Tensor, gen: torch.Tensor, mask_id: int,
                   eps: float, g: torch.Generator) -> torch.Tensor:
    """LLaDA SFT loss. x (B, T) clean rows, gen (B, T) generation positions -> scalar."""
    b = x.shape[0]
    # stratified t: one draw per stratum [i/B, (i+1)/B) (MDLM's low-discrepancy sampler), so every
    # batch covers the noise levels evenly; each row's t is still marginally U(eps, 1]
    u = (torch.arange(b) + torch.rand(b, generator=g))[torch.randperm(b, generator=g)] / b
    t = ((1 - eps) * u + eps)[:, None]                                    # (B, 1) mask ratio
    masked = (torch.rand(x.shape, generator=g) < t) & gen                 # (B, T)
    logits = model(torch.where(masked, mask_id, x))                       # (B, T, V)
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")     # (n_masked,)
    weight = (1.0 / t).expand_as(x)[masked]                               # (n_masked,) 1/t
    # Self-normalised: sum(ce / t) / sum(1 / t). LLaDA's per-row form sum(ce / t) / len lets a
    # few rows with t near eps dominate every (clipped) step; on this suite it stalled near
    # chance while the self-normalised weights learned copy in ~250 steps (same seed and model).
    return (ce * weight).sum() / weight.sum().clamp_min(1e-12)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def prepare(cfg: TrainConfig):
    """Seed everything; write the tokenizer; return (tokenizer, ids, config dict, model)."""
    from transformers import AutoTokenizer
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(cfg.out)
    ids = save_tokenizer(out, cfg.max_seq)
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    config = model_config(cfg, ids)
    model = build_model(config, ids, cfg.seed)
    if cfg.init_from:                 # continue training: same shapes, weights from the folder
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(Path(cfg.init_from) / "model.safetensors")), strict=True)
    return tokenizer, ids, config, model


def train(cfg: TrainConfig) -> dict:
    """Run the training loop and write the checkpoint folder; returns a summary dict."""
    tokenizer, ids, config, model = prepare(cfg)
    model.to(cfg.device).train()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    batcher, data = Batcher(tokenizer, ids, cfg), tasks.stream("train", cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    start, ema = time.time(), None
    bar = tqdm(range(cfg.steps), desc="train", unit="step")
    for step in bar:
        x, gen = batcher([next(data) for _ in range(cfg.batch_size)])
        loss = diffusion_loss(model, x.to(cfg.device), gen.to(cfg.device), ids["mask"], cfg.eps, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    summary = {"train_seconds": round(time.time() - start, 1), "final_loss_ema": round(ema, 5)}
    summary["sha256"] = save_checkpoint(model.eval(), config, ids, cfg)
    return summary


def save_checkpoint(model: torch.nn.Module, config: dict, ids: dict[str, int],
                    cfg: TrainConfig) -> str:
    """Write config.json, generation_config.json, model.safetensors, training_args.json; return
    the sha256 of model.safetensors (the reproducibility fingerprint)."""
    out = Path(cfg.out)
    dtype = SAVE_DTYPES[cfg.save_dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["eos"], "mask_token_id": ids["mask"], "max_new_tokens": cfg.gen_min})
    args = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device")}
    args["init_from"] = Path(cfg.init_from).name if cfg.init_from else ""   # no machine paths
    _write_json(out / "training_args.json", args)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
