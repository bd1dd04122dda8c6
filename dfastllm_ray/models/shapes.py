"""Published model shapes, for memory planning and random-weight benchmarks (no download).

Values are those of the official `config.json` files; the token ids are LLaDA's tokenizer's.
"""
from __future__ import annotations

from .spec import ModelSpec

# GSAI-ML/LLaDA-8B-Instruct: d_model 4096, 32 layers, 32 heads (no GQA), mlp 12288, vocab 126464
LLADA_8B = ModelSpec(arch="llada", vocab_size=126464, hidden_size=4096, num_layers=32,
                     num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=12288,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position=4096, qkv_bias=False,
                     mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                     bos_token_id=126080, eot_token_id=126348)

# Dream-org/Dream-v0-Instruct-7B (Qwen2.5-7B layout): hidden 3584, 28 layers, 28 query heads,
# 4 key/value heads (GQA), mlp 18944, vocab 152064, q/k/v biases; ids of its Qwen2 tokenizer
# (<|endoftext|> 151643 is bos/eos/pad, <|im_end|> 151645 ends a turn, <|mask|> 151666)
DREAM_7B = ModelSpec(arch="dream", vocab_size=152064, hidden_size=3584, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, max_position=131072, qkv_bias=True,
                     mask_token_id=151666, eos_token_id=151643, pad_token_id=151643,
                     bos_token_id=151643, eot_token_id=151645, logits_shift=True)

# Qwen/Qwen2.5-0.5B (the APD paper's verifier for Dream-7B): hidden 896, 24 layers, 14 query
# heads, 2 key/value heads, head 64, mlp 4864, vocab 151936 (<= Dream's 152064: the same ids),
# q/k/v biases, LM head tied to the embeddings; causal (no mask token)
QWEN25_05B = ModelSpec(arch="qwen2", vocab_size=151936, hidden_size=896, num_layers=24,
                       num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position=32768, qkv_bias=True,
                       mask_token_id=None, eos_token_id=151643, pad_token_id=None,
                       bos_token_id=151643, eot_token_id=151645, causal=True)

# JetAstra SDAR-4B (Qwen3-4B layout, block diffusion): hidden 2560, 36 layers, 32 query heads,
# 8 key/value heads, head 128, mlp 9728, vocab 151936, no biases, q/k norms, untied head, blocks
# of 4; ids of its Qwen3 tokenizer (<|endoftext|> 151643, <|im_end|> 151645, <|MASK|> 151669)
SDAR_4B = ModelSpec(arch="sdar", vocab_size=151936, hidden_size=2560, num_layers=36,
                    num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=9728,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, max_position=32768, qkv_bias=False,
                    mask_token_id=151669, eos_token_id=151643, pad_token_id=151643,
                    bos_token_id=151643, eot_token_id=151645, block_size=4)

KNOWN_SHAPES = {"llada-8b": LLADA_8B, "dream-7b": DREAM_7B, "qwen2.5-0.5b": QWEN25_05B,
                "sdar-4b": SDAR_4B}
TIED_SHAPES = frozenset({"qwen2.5-0.5b"})     # LM head = the embedding matrix


def num_parameters(spec: ModelSpec, tied_embeddings: bool = False) -> int:
    """Weights of a LLaDA / Dream-style model with this spec (norms included, biases included)."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    attn = 2 * h * h + 2 * h * kv + (h + 2 * kv if spec.qkv_bias else 0)
    mlp = 3 * h * spec.intermediate_size
    per_layer = attn + mlp + 2 * h
    head = 0 if tied_embeddings else spec.vocab_size * h
    return spec.vocab_size * h + spec.num_layers * per_layer + h + head
