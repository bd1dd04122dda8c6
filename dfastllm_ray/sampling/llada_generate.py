"""The LLaDA reference loop: ML-GSAI `generate` and Fast-dLLM's three `generate*` in one function.

`llada_generate(model, prompt, params, spec=, variant=)` reproduces, token for token and forward for
forward (REFERENCE_ALGORITHMS.md sections 2-3):

- `"llada"`: ML-GSAI/LLaDA `generate.generate` -- exactly steps/num_blocks forwards per block,
  float32 confidences, `cfg_scale`, `logits_eos_inf` / `confidence_eos_eot_inf`, attention mask.
- `"fastdllm"`: Fast-dLLM v1 `generate` -- full forwards until the block has no mask.
- `"fastdllm_prefix"`: `generate_with_prefix_cache` -- a full forward per block fills the cache;
  later forwards run `x[:, s:]` against the cached prefix [0, s).
- `"fastdllm_dual"`: `generate_with_dual_cache` -- later forwards run only the block `x[:, s:e]`
  against the cached prefix and suffix; bounded to steps/num_blocks forwards per block, so a
  threshold run can end with masks left (the official loop does the same).

Each step is the shared step-level contract: `propose` (Gumbel argmax, confidence) on the
masked positions that may commit, then `POLICIES[params.policy]` (`fixed` top-k quota,
`threshold`, `factor`). Random draws come from the global RNG with the official shapes and order
(Gumbel uniforms over the whole forward window, then the `random` remasking uniforms; the prefix
loop's extra unused noise draw included), so `torch.manual_seed(s)` before the call reproduces the
seeded fixtures. Returns `(x, nfe)`: the canvas (B, prompt_len + gen_length) and model forwards.

Padded batches (ML-GSAI only; Fast-dLLM's model ignores masks): `attention_mask` (B, prompt_len),
0 = left pad, is extended with ones over the generation and becomes a key-padding bias
(`finfo.min` on padded keys; padded query rows are still computed). Positions stay absolute,
0..L-1 in every row, as in the official model: a row with p pads holds its prompt at p..p+n-1
rather than 0..n-1. RoPE scores depend only on position differences, so the pad count changes a
row's logits only through float rounding of the rotations -- but it does change them (and can flip
near-ties, more so in bfloat16); a padded row is reproduced as the official code computes it, not
as the same prompt run alone. Dream, by contrast, shifts positions past the pads (dream_generate.py).

Where the official code would fail, this loop does something defined instead: CFG without an
attention mask (ML-GSAI raises; here it is the all-ones mask it is equivalent to), and a
Fast-dLLM top-k run whose block still has masks after its schedule (possible only when masks
inside the prompt take quota; the official code indexes past the schedule and raises; here each
extra step commits one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..models.kv_hooks import Capture, DualKV, PrefixKV
from ..models.layers import key_padding_bias
from .candidates import Candidates
from .noise import uniform
from .params import SamplingParams
from .policies import POLICIES
from .propose import propose
from .schedule import get_num_transfer_tokens


@dataclass(frozen=True)
class Variant:
    cache: Optional[str]        # None: full-canvas forward every step | "prefix" | "dual" (Fast-dLLM)
    bounded: bool               # at most steps/num_blocks forwards per block
    until_done: bool            # leave a block as soon as it has no mask (checked from the 2nd step)
    conf_dtype: torch.dtype     # softmax precision of the confidence (and `random` draws)
    extra_noise: bool = False   # prefix cache: one unused add_gumbel_noise per cached step


VARIANTS: dict[str, Variant] = {
    "llada": Variant(None, bounded=True, until_done=False, conf_dtype=torch.float32),
    "fastdllm": Variant(None, bounded=False, until_done=True, conf_dtype=torch.float64),
    "fastdllm_prefix": Variant("prefix", bounded=False, until_done=True, conf_dtype=torch.float64,
                               extra_noise=True),
    "fastdllm_dual": Variant("dual", bounded=True, until_done=True, conf_dtype=torch.float64),
}


@dataclass
class _Run:
    """The mutable state of one generate call."""
    model: Callable[..., Tensor]
    x: Tensor                        # (B, L) int64 canvas, updated in place
    params: SamplingParams
    spec: object                     # ModelSpec: mask/EOS/EOT ids
    variant: Variant
    key_mask: Optional[Tensor]       # (B, L) 1 = real token, or None when nothing is padded
    prompt_index: Tensor             # (B, L) bool: non-mask prompt positions (CFG's unconditional copy)
    steps_per_block: int
    hook: object = None              # PrefixKV / DualKV of the current block
    nfe: int = 0


@torch.no_grad()
def llada_generate(model: Callable[..., Tensor], prompt: Tensor, params: SamplingParams, *, spec,
                   variant: str = "llada", attention_mask: Optional[Tensor] = None,
                   ) -> tuple[Tensor, int]:
    """prompt (B, Lp) int64 -> (x (B, Lp + max_tokens) int64, nfe = model forwards).

    model: `model(input_ids, positions=, attn_bias=, kv=) -> logits` (LLaDAModel or a wrapper);
    spec: its ModelSpec (mask, EOS, EOT ids); variant: a key of VARIANTS; attention_mask
    (B, Lp) 1 = token, 0 = left pad ("llada" only). See the module docstring."""
    p, v = _validate(prompt, params, spec, variant, attention_mask)
    b, lp = prompt.shape
    gen, block = p.max_tokens, p.block_length
    x = torch.full((b, lp + gen), spec.mask_token_id, dtype=torch.long, device=prompt.device)
    x[:, :lp] = prompt
    key_mask = None
    if attention_mask is not None and bool((attention_mask == 0).any()):
        key_mask = torch.cat([attention_mask, torch.ones_like(x[:, lp:])], dim=1)   # (B, L)
    run = _Run(model, x, p, spec, v, key_mask, x != spec.mask_token_id,
               p.steps // (gen // block))
    for n in range(gen // block):
        _decode_block(run, lp + n * block, lp + (n + 1) * block)
    return run.x, run.nfe


def _decode_block(run: _Run, s: int, e: int) -> None:
    """Block [s, e): forwards until the variant's stopping rule says the block is over."""
    spb = run.steps_per_block
    quotas = get_num_transfer_tokens(run.x[:, s:e] == run.spec.mask_token_id, spb)   # (B, spb)
    i = 0
    while not _block_over(run, i, s, e):
        logits, lo = _forward(run, i, s, e)
        _commit(run, logits, lo, e, quotas[:, i] if i < spb else None)
        run.nfe += 1
        i += 1


def _block_over(run: _Run, i: int, s: int, e: int) -> bool:
    """Before forward i of block [s, e). ML-GSAI: after exactly steps-per-block forwards.
    Fast-dLLM: once no row has a mask in the block (batch-wide; the first forward always runs),
    the dual cache also after steps-per-block forwards."""
    if run.variant.bounded and i >= run.steps_per_block:
        return True
    return run.variant.until_done and i > 0 and not bool((run.x[:, s:e] == run.spec.mask_token_id).any())


def _forward(run: _Run, i: int, s: int, e: int) -> tuple[Tensor, int]:
    """Step i of block [s, e) -> (logits (B, Lw, V) for window [lo, lo + Lw), lo)."""
    cache = run.variant.cache
    if cache is None:
        return _full_forward(run, None), 0
    if i == 0:                                   # Fast-dLLM: a full forward (re)fills the cache
        captured = Capture()
        logits = _full_forward(run, captured)
        run.hook = PrefixKV(captured, s) if cache == "prefix" else DualKV(captured, s, e)
        return logits, 0
    hi = run.x.shape[1] if cache == "prefix" else e
    ids = run.x[:, s:hi]
    positions = torch.arange(s, hi, device=ids.device).expand(ids.shape[0], -1)   # absolute
    return run.model(ids, positions=positions, kv=run.hook), s


def _full_forward(run: _Run, kv) -> Tensor:
    """Whole canvas -> logits (B, L, V); with CFG, ML-GSAI's unsupervised guidance.

    CFG's unconditional copy masks every prompt position (pad tokens included) and shares the
    key-padding mask; logits = u + (cfg_scale + 1) * (c - u), in the official order."""
    x, cfg = run.x, run.params.cfg_scale
    bias = None if run.key_mask is None else key_padding_bias(run.key_mask)   # (B, 1, 1, L)
    if cfg <= 0:
        return run.model(x, attn_bias=bias, kv=kv)
    uncond = x.clone()
    uncond[run.prompt_index] = run.spec.mask_token_id
    both = run.model(torch.cat([x, uncond]), attn_bias=None if bias is None else torch.cat([bias, bias]),
                     kv=kv)
    c, u = both.chunk(2)
    return u + (cfg + 1) * (c - u)


def _commit(run: _Run, logits: Tensor, lo: int, e: int, quota: Optional[Tensor]) -> None:
    """One step's transfer. Candidates are the masked positions in [lo, e): with a full forward
    that includes masks inside the prompt and leftovers of earlier blocks, as in the official code.
    quota (B,) int64 is the schedule's count, None past the schedule (threshold / factor loops)."""
    p, v = run.params, run.variant
    b, lw, vocab = logits.shape
    if v.extra_noise and lo > 0 and p.temperature > 0:
        uniform((b, lw, vocab), device=logits.device)          # Fast-dLLM's unused noise draw
    gumbel_u = uniform((b, lw, vocab), device=logits.device) if p.temperature > 0 else None
    conf_u = (uniform((b, lw), device=logits.device, dtype=v.conf_dtype)
              if p.remasking == "random" else None)
    for row in range(b):
        if quota is not None and int(quota[row]) == 0 and p.policy == "fixed":
            continue                    # the schedule gives this step nothing: the forward commits none
        window = run.x[row, lo:lo + lw]                                      # (Lw,) view
        idx = torch.nonzero(window[:e - lo] == run.spec.mask_token_id).flatten()
        cand = propose(logits[row, idx], p, spec=run.spec, conf_dtype=v.conf_dtype,
                       gumbel_u=None if gumbel_u is None else gumbel_u[row, idx],
                       conf_u=None if conf_u is None else conf_u[row, idx])
        slots = _official_row(cand, idx, window)
        commit = POLICIES[p.policy](slots, 0 if quota is None else int(quota[row]), p, None)
        window[commit] = slots.tokens[commit]


def _official_row(cand: Candidates, idx: Tensor, window: Tensor) -> Candidates:
    """Candidates (n) at window indices idx -> Candidates over the whole window (Lw), laid out as
    the official code ranks a row: other slots keep their token (committing them is a no-op, as
    `x0 = where(mask_index, x0, x)`) with confidence -inf, so torch.topk breaks ties the same way."""
    tokens = window.clone()
    tokens[idx] = cand.tokens
    conf = torch.full(window.shape, float("-inf"), dtype=torch.float64, device=window.device)
    conf[idx] = cand.conf
    ent = torch.full(window.shape, float("inf"), dtype=torch.float64, device=window.device)
    ent[idx] = cand.entropy
    return Candidates(tokens, conf, ent)


def _validate(prompt: Tensor, params: SamplingParams, spec, variant: str,
              attention_mask: Optional[Tensor]) -> tuple[SamplingParams, Variant]:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: use one of {sorted(VARIANTS)}")
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt shape {tuple(prompt.shape)} is invalid: need (batch, prompt_len >= 1)")
    if params.alg is not None:
        raise ValueError(f"alg={params.alg!r} is a Dream setting: use sampling.dream_generate")
    p = params.resolve(getattr(spec, "max_position", None), prompt.shape[1])
    if p.max_tokens % p.block_length:
        raise ValueError(f"block_length={p.block_length} must divide max_tokens={p.max_tokens}")
    if variant != "llada" and p.cfg_scale > 0:
        raise ValueError(f"cfg_scale={p.cfg_scale} is only supported by variant 'llada' "
                         "(Fast-dLLM has no classifier-free guidance)")
    if variant != "llada" and attention_mask is not None:
        raise ValueError(f"attention_mask is only supported by variant 'llada': Fast-dLLM's "
                         f"model ignores attention masks (variant={variant!r})")
    if attention_mask is not None and attention_mask.shape != prompt.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal the "
                         f"prompt's {tuple(prompt.shape)}")
    return p, VARIANTS[variant]
