"""`ModelSpec`: everything the engine and samplers need to know about a checkpoint.

Model quirks live here as data (mask id, logit shift, EOS/EOT ids, context length), never as
branches on the architecture name in the samplers or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    arch: str                      # registry key: "llada" | "dream" | "qwen2" | "sdar"
    vocab_size: int                # rows of the LM head
    hidden_size: int
    num_layers: int
    num_heads: int                 # query heads
    num_kv_heads: int              # key/value heads (GQA when < num_heads)
    head_dim: int
    intermediate_size: int         # SwiGLU hidden width
    rope_theta: float
    rms_norm_eps: float
    max_position: int              # context length in tokens (prompt + generation)
    qkv_bias: bool                 # Dream (Qwen2 layout) has q/k/v biases; LLaDA has none
    mask_token_id: int | None      # the [MASK] token diffusion decoding fills in (None: causal LM)
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None = None
    eot_token_id: int | None = None   # end-of-turn (LLaDA-Instruct <|eot_id|>), from the tokenizer
    logits_shift: bool = False     # Dream: position p is predicted by the output at p-1
    causal: bool = False           # an autoregressive LM (Qwen2 verifier): causal mask, exact KV cache
    block_size: int | None = None  # SDAR: block-causal attention, a query sees the keys of its own
                                   # block of this many tokens and of earlier blocks (None: not
                                   # block-causal; the diffusion engine refuses a block-causal model)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS and EOT: a committed block holding one of them ends the request (early exit)."""
        return tuple(t for t in (self.eos_token_id, self.eot_token_id) if t is not None)
