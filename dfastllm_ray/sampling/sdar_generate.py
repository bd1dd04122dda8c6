"""The SDAR reference loop: JetAstra/SDAR `generate.block_diffusion_generate`, forward for forward.

    out = block_diffusion_generate(model, prompt, BlockDiffusionParams(...), spec, generator)

Block diffusion (REFERENCE_ALGORITHMS.md section 9): the canvas is `ceil((P + gen_length) / B)`
blocks of B = `block_length` tokens (so up to B-1 positions past P + gen_length are generated
too); the whole prompt blocks are prefilled in one block-causal forward that stores their K/V;
then each block is denoised alone against the cache (`ReadOnlyKV`, the official
`store_kv=False`) until it has no mask, and one more forward stores its K/V (`CausalKV`,
`store_kv=True`). The prompt's tail (P mod B tokens) sits fixed in the first decoded block.

Each denoising forward drafts every position of the block with `sample_with_temperature_topk_topp`
(always a draw: one `multinomial` over (B, V) per forward, from `generator` or the global RNG, so
`torch.manual_seed(s)` before the call reproduces the seeded fixtures) and commits by
`remasking_strategy`, with `get_num_transfer_tokens(B, steps)` positions per step:
- `sequential`: the first k masks, left to right;
- `low_confidence_static`: the top-k confidences (non-masks at -inf);
- `low_confidence_dynamic`: every mask with confidence > `confidence_threshold` when there are at
  least k of them, else the top-k.
Quirk, reproduced: when k exceeds the masks left (a block holding the prompt's tail, or
steps < B), top-k also picks positions at -inf -- the prompt tail or committed tokens -- and they
get the new draw (`torch.topk` is called on the same 1-D tensor as the reference, so the same
positions win the -inf ties). `overwrite_committed=False` (not an official knob) clips k to the
masks left instead, as the engine does. After each block, generation stops when an id of
`stopping_criteria_idx` appears past the prompt; the blocks after it stay masked.

Refused where the reference has no behaviour: `remasking_strategy="entropy_bounded"` (the official
branch uses `transfer_index` before creating it: UnboundLocalError) and `temperature <= 0` (the
official sampler divides the logits by it: there is no greedy mode; `top_k=1` is the greedy form).
Batch size 1, as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ..models.block_kv import ReadOnlyKV
from ..models.causal_kv import CausalKV
from ..models.spec import ModelSpec
from .dream import top_k_logits, top_p_logits
from .schedule import transfer_counts

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic")


@dataclass(frozen=True)
class BlockDiffusionParams:
    """The official call's knobs, by the official names and defaults (except gen_length)."""
    gen_length: int = 128                 # tokens after the prompt (the canvas rounds up to blocks)
    block_length: int = 8                 # B: tokens per block, the block-causal mask's granule
    denoising_steps: int = 8              # commit-schedule steps per block (forwards <= this + 1)
    temperature: float = 1.0              # > 0; the logits are divided by it unless it is 1
    top_k: int = 0                        # 0: off; 1 is the greedy form (confidence 1.0)
    top_p: float = 1.0                    # 1.0: off
    remasking_strategy: str = "low_confidence_dynamic"
    confidence_threshold: float = 0.85    # low_confidence_dynamic only
    stopping_criteria_idx: Optional[tuple[int, ...]] = None   # stop ids checked after each block
    # not an official knob: False clips k to the masks left, so committed tokens and the prompt's
    # tail are never drawn again (the engine's rule, engine/block_plan.py); True: the quirk
    overwrite_committed: bool = True

    def __post_init__(self):
        if self.remasking_strategy == "entropy_bounded":
            raise ValueError("remasking_strategy='entropy_bounded' is not supported: the official "
                             "branch crashes (UnboundLocalError on transfer_index), so there is no "
                             f"reference behaviour to reproduce; use one of {STRATEGIES}")
        if self.remasking_strategy not in STRATEGIES:
            raise ValueError(f"remasking_strategy={self.remasking_strategy!r} is invalid: use one "
                             f"of {STRATEGIES}")
        for name in ("gen_length", "block_length", "denoising_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: SDAR's sampler always "
                             "draws and divides the logits by the temperature; use temperature > 0 "
                             "(top_k=1 is the greedy form)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k={self.top_k!r}, top_p={self.top_p!r} are invalid: need "
                             "top_k >= 0 (0: off) and 0 < top_p <= 1 (1: off)")
        if self.stopping_criteria_idx is not None:
            object.__setattr__(self, "stopping_criteria_idx", tuple(self.stopping_criteria_idx))


@dataclass
class BlockDiffusionOutput:
    x: Tensor                      # (1, num_blocks * B) int64 canvas; blocks after a stop: masks
    nfe: int = 0                   # model forwards: prefill + denoising + storing forwards
    store_forwards: int = 0        # forwards that stored K/V (prefill and one per finished block)
    forward_lengths: list[int] = field(default_factory=list)   # query length of each forward


def sample_with_temperature_topk_topp(logits: Tensor, temperature: float, top_k: int,
                                      top_p: float, generator: Optional[torch.Generator] = None
                                      ) -> tuple[Tensor, Tensor]:
    """logits (n, V) -> (tokens (n,) int64, their probabilities (n,)) after the filters.

    Official order: temperature, top-k, top-p, softmax, one multinomial over the n rows. The
    filters are Dream's (finfo.min instead of the official -inf: both softmax to exactly 0)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_logits(logits, top_k)
    if top_p < 1.0:
        logits = top_p_logits(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    token = torch.multinomial(probs, num_samples=1, generator=generator)    # (n, 1)
    return token[:, 0], probs.gather(-1, token)[:, 0]


def select_sequential(mask: Tensor, conf: Tensor, k: int, threshold: float) -> Tensor:
    """(B,) masks -> (B,) bool: k positions from the first mask on."""
    out = torch.zeros_like(mask)
    first = int(mask.nonzero()[0, 0])
    out[first:first + k] = True
    return out


def select_static(mask: Tensor, conf: Tensor, k: int, threshold: float) -> Tensor:
    """Top-k confidence, non-masks at -inf (picked too when k > masks left: the quirk)."""
    out = torch.zeros_like(mask)
    out[torch.topk(torch.where(mask, conf, -torch.inf), k).indices] = True
    return out


def select_dynamic(mask: Tensor, conf: Tensor, k: int, threshold: float) -> Tensor:
    """Every mask above the threshold if at least k are, else the static top-k."""
    high = torch.where(mask, conf, -torch.inf) > threshold
    return high if int(high.sum()) >= k else select_static(mask, conf, k, threshold)


SELECT: dict[str, Callable[[Tensor, Tensor, int, float], Tensor]] = {
    "sequential": select_sequential,
    "low_confidence_static": select_static,
    "low_confidence_dynamic": select_dynamic,
}


@dataclass
class _Run:
    """One call's state: the canvas in `out.x`, the committed blocks' K/V in `kv`."""
    model: Callable[..., Tensor]
    params: BlockDiffusionParams
    mask_id: int
    generator: Optional[torch.Generator]
    out: BlockDiffusionOutput
    kv: CausalKV = field(default_factory=CausalKV)

    def forward(self, ids: Tensor, start: int, store: bool) -> Tensor:
        """ids (1, Lq) at positions start.. -> logits (1, Lq, V) (none when storing: unused)."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        keep = torch.empty((1, 0), dtype=torch.long, device=ids.device) if store else None
        hook = self.kv if store else ReadOnlyKV(self.kv)
        self.out.nfe += 1
        self.out.store_forwards += int(store)
        self.out.forward_lengths.append(ids.shape[1])
        return self.model(ids, positions=positions, kv=hook, logits_index=keep,
                          block_size=self.params.block_length)

    def decode_block(self, start: int) -> None:
        """Denoise the block at [start, start + B) until no mask is left, then store its K/V."""
        p = self.params
        x = self.out.x
        block = x[:, start:start + p.block_length].clone()                  # (1, B)
        counts = transfer_counts(p.block_length, p.denoising_steps)
        select = SELECT[p.remasking_strategy]
        for step in range(p.denoising_steps + 1):
            mask = block[0] == self.mask_id                                   # (B,)
            if not bool(mask.any()):
                self.forward(block, start, store=True)
                break
            logits = self.forward(block, start, store=False)[0]               # (B, V)
            x0, conf = sample_with_temperature_topk_topp(logits, p.temperature, p.top_k,
                                                         p.top_p, self.generator)
            k = counts[step] if p.overwrite_committed else min(counts[step], int(mask.sum()))
            commit = select(mask, conf, k, p.confidence_threshold)
            block[0, commit] = x0[commit]
        x[:, start:start + p.block_length] = block


def stopped(x: Tensor, prompt_len: int, stop_ids: Optional[tuple[int, ...]]) -> bool:
    """Any stop id past the prompt (the masks of later blocks never match one)."""
    if not stop_ids:
        return False
    return bool(torch.isin(x[:, prompt_len:], torch.tensor(stop_ids, device=x.device)).any())


@torch.no_grad()
def block_diffusion_generate(model: Callable[..., Tensor], prompt: Tensor,
                             params: BlockDiffusionParams, spec: ModelSpec,
                             generator: Optional[torch.Generator] = None) -> BlockDiffusionOutput:
    """prompt (1, P) int64 -> BlockDiffusionOutput (canvas, NFE, forwards); see the module doc."""
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)} is invalid: SDAR's reference loop "
                         "decodes one sequence, shape (1, P)")
    if spec.mask_token_id is None or spec.block_size is None:
        raise ValueError(f"model arch {spec.arch!r} is not a block-diffusion model (needs "
                         "mask_token_id and block_size on its spec)")
    b, plen = params.block_length, prompt.shape[1]
    num_blocks = -(-(plen + params.gen_length) // b)
    x = torch.full((1, num_blocks * b), spec.mask_token_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    run = _Run(model, params, spec.mask_token_id, generator, BlockDiffusionOutput(x))
    prefill_blocks = plen // b
    if prefill_blocks:
        run.forward(x[:, :prefill_blocks * b], 0, store=True)
    for n in range(prefill_blocks, num_blocks):
        run.decode_block(n * b)
        if stopped(x, plen, params.stopping_criteria_idx):
            break
    return run.out
