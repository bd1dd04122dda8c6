"""SDAR's training objective: the block-diffusion loss of BD3-LM, in one forward per row group.

A row (prompt + answer + EOT + EOS..., length L) is cut into blocks of `block` tokens from
position 0, the same grid the decoding loop uses (sampling/sdar_generate.py: blocks aligned to the
canvas start). Each (row, block) draws its own noise level t ~ U(eps, 1] and masks each of its
generation positions with probability t; prompt positions are never masked (SFT). The model must
recover the masked tokens of block b from the noisy block b and the CLEAN blocks before it, which
is the state the decoding loop is in: earlier blocks committed and cached, the current one
partly masked.

All blocks are trained in one forward with the two-stream layout of BD3-LM's vectorised training
(Arriola et al. 2025, "Block Diffusion"): input = concat(x_noisy, x_clean) of
length 2L, positions 0..L-1 twice, and the `two_stream_mask` below. The clean stream plays the
role of the KV cache of earlier blocks; its own attention is block-causal, as the cache's
storing forwards are. Only the noisy stream is scored.

Rows are cut after the block that holds their EOT (`crop_to_answer_blocks`): the decoding loop
stops after the block in which a stop id appears, so the EOS-only blocks after it are never
decoded, and scoring them would spend most of each step (the trainer pads rows with up to 40
EOS) on tokens no generation reaches.

The loss weights each masked token by 1/t of its block and self-normalises over the batch,
sum(ce / t) / sum(1 / t), as the trainer's `diffusion_loss` (same reason: the per-row form lets
the few blocks with t near eps dominate a clipped step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def two_stream_mask(length: int, block: int, device: torch.device | str = "cpu") -> Tensor:
    """bool (2L, 2L), True = attend. Rows/columns 0..L-1 are the noisy copy, L..2L-1 the clean
    one; with b(i) = (i mod L) // block:
    * noisy query i sees noisy keys of its own block and clean keys of earlier blocks;
    * clean query i sees clean keys of its own and earlier blocks (block-causal), no noisy key."""
    blk = torch.arange(length, device=device) // block
    q, k = blk[:, None], blk[None, :]                                     # (L, 1), (1, L)
    top = torch.cat([q == k, k < q], dim=1)                               # noisy queries
    bottom = torch.cat([torch.zeros_like(q == k), k <= q], dim=1)         # clean queries
    return torch.cat([top, bottom], dim=0)


def block_noise(gen: Tensor, block: int, eps: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """gen (B, L) generation positions -> (masked (B, L) bool, t (B, L) the mask ratio of each
    position's block). One t per (row, block), marginally U(eps, 1]."""
    b, length = gen.shape
    n_blocks = -(-length // block)
    t_block = (1 - eps) * torch.rand(b, n_blocks, generator=g) + eps      # (B, nb)
    t = t_block.to(gen.device).repeat_interleave(block, dim=1)[:, :length]   # (B, L)
    masked = (torch.rand(gen.shape, generator=g).to(gen.device) < t) & gen
    return masked, t


def crop_to_answer_blocks(x: Tensor, gen: Tensor, ans: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """x, gen, ans (B, L) (ans: answer + EOT positions) -> (x, gen) of width W <= L: each row's
    generation positions end with the block holding its EOT; W is the widest such end."""
    length = x.shape[1]
    idx = torch.arange(length, device=x.device)
    last = torch.where(ans, idx, -1).max(dim=1).values                  # (B,) EOT position
    end = ((last // block + 1) * block).clamp(max=length)                 # (B,) its block's end
    width = int(end.max())
    return x[:, :width], (gen & (idx[None] < end[:, None]))[:, :width]


def block_diffusion_loss(model: torch.nn.Module, x: Tensor, gen: Tensor, ans: Tensor,
                         mask_id: int, block: int, eps: float,
                         g: torch.Generator) -> tuple[Tensor, Tensor]:
    """x (B, L) clean rows, gen (B, L) generation positions, ans (B, L) answer + EOT positions
    -> (sum of weighted CE, sum of weights), summed over row groups by the caller before
    dividing (as `diffusion_loss`). `model` is an `SDARForCausalLM` (takes positions, a bool
    attn_bias and logits_index)."""
    x, gen = crop_to_answer_blocks(x, gen, ans, block)
    b, length = x.shape
    masked, t = block_noise(gen, block, eps, g)
    ids = torch.cat([torch.where(masked, mask_id, x), x], dim=1)             # (B, 2L)
    pos = torch.arange(length, device=x.device).repeat(2)[None].expand(b, -1)   # (B, 2L)
    bias = two_stream_mask(length, block, x.device)[None, None].expand(b, 1, -1, -1)
    noisy_rows = torch.arange(length, device=x.device)[None].expand(b, -1)   # (B, L)
    logits = model(ids, positions=pos, attn_bias=bias, logits_index=noisy_rows)   # (B, L, V)
    ce = F.cross_entropy(logits[masked].float(), x[masked], reduction="none")   # (n_masked,)
    weight = (1.0 / t)[masked]                                                # (n_masked,)
    return (ce * weight).sum(), weight.sum()
