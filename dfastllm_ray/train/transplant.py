"""Start a Qwen2-layout model (the Dream twin) or a Qwen3-layout SDAR from a tiny LLaDA's weights.

`python -m dfastllm_ray.train.transplant --llada DIR --out DIR --n-kv-heads 2` writes a
`model.safetensors` with Dream's parameter names for `--init-from`; `--to sdar` writes SDAR's
(`llada_to_sdar`). All are Llama-style blocks (RMSNorm, rotate-half RoPE, SwiGLU), so the
mapping is one to one, except (Dream):
* GQA: LLaDA's tiny model has one K/V head per query head; Dream's K/V head j serves query heads
  j*g .. j*g+g-1 (models/layers.py `attention`), so its K/V projections are the mean of that
  group's (the GQA paper's "mean pooling" conversion); q/k/v biases start at 0.
* the logit shift: LLaDA scores token p at hidden state p, Dream at p-1. No weight expresses
  that; fine-tuning has to learn it (the embedding, the blocks and the head are kept).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = {  # LLaDA block name -> Dream layer name
    "attn_norm.weight": "input_layernorm.weight", "ff_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight", "attn_out.weight": "self_attn.o_proj.weight",
    "ff_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def pool_heads(w: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """(H * D, d) K or V projection -> (H_kv * D, d), the mean over each group of H / H_kv heads."""
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    d_out, d_in = w.shape
    heads = w.reshape(n_kv_heads, n_heads // n_kv_heads, d_out // n_heads, d_in)
    return heads.mean(1).reshape(-1, d_in)


def llada_to_dream(state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict:
    out = {"model.embed_tokens.weight": state["model.transformer.wte.weight"],
           "model.norm.weight": state["model.transformer.ln_f.weight"],
           "lm_head.weight": state["model.transformer.ff_out.weight"]}
    n_layers = 1 + max(int(k.split(".")[3]) for k in state if ".blocks." in k)
    for i in range(n_layers):
        src, dst = f"model.transformer.blocks.{i}.", f"model.layers.{i}."
        for a, b in BLOCK.items():
            w = state[src + a]
            if a in ("k_proj.weight", "v_proj.weight"):
                w = pool_heads(w, n_heads, n_kv_heads)
            out[dst + b] = w
        for p in ("q_proj", "k_proj", "v_proj"):
            rows = out[dst + f"self_attn.{p}.weight"].shape[0]
            out[dst + f"self_attn.{p}.bias"] = torch.zeros(rows)
    return {k: v.contiguous() for k, v in out.items()}


def llada_to_sdar(state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict:
    """Dream's mapping without the q/k/v biases (SDAR has none; LLaDA had none either) plus
    Qwen3's per-head q/k RMSNorms at weight 1. LLaDA and SDAR both score a masked position from
    its own hidden state (no logit shift), so unlike the Dream twin nothing positional must be
    relearned; the q/k norms and the block-causal mask are the changes fine-tuning absorbs."""
    out = {k: v for k, v in llada_to_dream(state, n_heads, n_kv_heads).items()
           if not k.endswith("_proj.bias")}
    n_layers = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("model.layers."))
    head_dim = out["model.layers.0.self_attn.q_proj.weight"].shape[0] // n_heads
    for i in range(n_layers):
        for norm in ("q_norm", "k_norm"):
            out[f"model.layers.{i}.self_attn.{norm}.weight"] = torch.ones(head_dim)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llada", required=True, help="folder with the LLaDA model.safetensors")
    p.add_argument("--out", required=True, help="folder to write model.safetensors into")
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--to", choices=("dream", "sdar"), default="dream", help="target layout")
    args = p.parse_args(argv)
    convert = llada_to_sdar if args.to == "sdar" else llada_to_dream
    state = load_file(str(Path(args.llada) / "model.safetensors"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    save_file(convert(state, args.n_heads, args.n_kv_heads),
              str(Path(args.out) / "model.safetensors"), metadata={"format": "pt"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
