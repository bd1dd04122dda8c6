"""Block diffusion's steps (SDAR, kv mode "block"): the reference loop one step at a time.

JetAstra/SDAR `block_diffusion_generate` (REFERENCE_ALGORITHMS.md 9; `sampling/sdar_generate.py`)
as the engine runs it beside every other request:

- blocks of B = `block_length` positions start at multiples of B from the canvas start, so
  block 0 holds the prompt's tail (P mod B tokens, fixed) before its masks;
- PREFILL [kv_written, block 0's start): the whole prompt blocks in one block-causal forward
  that writes their K/V to the request's pages (the official prefill with `store_kv=True`);
- CACHED [block start, block end) against the pages of every earlier block (`store_kv=False`:
  keys [0, block end), nothing after the block exists for it), the block's masks compete and
  `transfer_counts(B, steps per block)[step]` of them commit (the strategy's k);
- once the block has no mask left, PREFILL over the block writes its K/V (the official storing
  forward); then the block is done and the next one opens.

`EngineConfig.block_store="fused"` (the default) drops the storing forwards: the block is done
as its last mask commits, and the next block's first denoising window starts where the stored
K/V end (the decoded block, or the whole prompt blocks for block 0), under a block-causal mask,
so it writes their K/V while decoding; after the last block nothing is stored. The same
attention, one forward fewer per block (and per prefill). "separate" keeps the official order.

Where the official code commits more positions than the masks left (k past the masks: its top-k
also picks the prompt's tail or committed tokens and overwrites them with new draws), the engine
commits the masks left: committed tokens never change, the prompt least of all. With k within
the masks, which is every step of a block without a prompt tail and steps <= B, the two agree.
"""
from __future__ import annotations

from .outputs import CACHED, PREFILL, ScheduledRequest
from .request import Request
from ..sampling.schedule import transfer_counts

BLOCK = "block"                 # the kv mode of block-diffusion requests (set by the engine)


def prefix_pages(req: Request, page_size: int) -> int:
    """Prompt pages the prefix cache may share: the full pages inside the whole prompt blocks.
    A position's K/V depends on the tokens of its block and the earlier ones, so a page is
    determined by the tokens up to its end only when pages end on block boundaries
    (page_size a multiple of B); otherwise none is shared."""
    if page_size % req.params.block_length:
        return 0
    return req.block_origin // page_size


def open_block(req: Request) -> None:
    """The block's commit schedule: B // steps per step, the remainder to the first steps
    (SDAR's `get_num_transfer_tokens(B, steps)`, over the whole block, prompt tail included)."""
    req.block_step = 0
    req.block_quota = transfer_counts(req.params.block_length, req.steps_per_block)


def plan_block(req: Request) -> ScheduledRequest:
    """The next forward of `req`: the prompt's prefill, a denoising step, or the block's store.
    Fused (`req.fused_store`): what is not stored yet (the prompt blocks, the block decoded
    last) joins the window of the active block's denoising step instead."""
    s, e = req.block_start, req.block_end
    if not req.fused_store:
        if req.kv_written < s:          # whole prompt blocks (or a chunk of them) not stored yet
            return _store(req, req.kv_written, s)
        if req.masked_block == 0:       # the block is decoded: store its K/V
            return _store(req, s, e)
    q_start = min(req.kv_written, s)
    i = req.block_step
    quota = req.block_quota[i] if i < len(req.block_quota) else 0
    n = req.masked_block
    return ScheduledRequest(request_id=req.request_id, kind=CACHED, q_start=q_start,
                            q_len=e - q_start, kv_len=e, cand_start=s, cand_end=e,
                            num_candidates=n, quota=quota, k=min(quota, n),
                            policy=req.params.policy, schedule_step=i,
                            schedule_len=req.steps_per_block, slot=req.slot)


def _store(req: Request, start: int, end: int) -> ScheduledRequest:
    """A forward that writes the K/V of [start, end) and decodes nothing."""
    return ScheduledRequest(request_id=req.request_id, kind=PREFILL, q_start=start,
                            q_len=end - start, kv_len=end, cand_start=end, cand_end=end,
                            num_candidates=0, quota=0, k=0, policy="fixed",
                            schedule_step=req.block_step, schedule_len=req.steps_per_block,
                            slot=req.slot)


def prefill_chunk(req: Request, item: ScheduledRequest, budget: int) -> ScheduledRequest | None:
    """`chunked_refresh`: a window too wide for the step's token budget stores the K/V of its
    first whole blocks before the active block (within `budget`) and decodes nothing; the next
    step goes on from there (the block-causal mask makes a chunk's keys those of one forward)."""
    b = req.params.block_length
    c = min(budget, req.block_start - item.q_start) // b * b
    return _store(req, item.q_start, item.q_start + c) if c >= b else None


def after_store(req: Request, item: ScheduledRequest) -> bool:
    """Record a storing forward's K/V; True when it stored the active block (it is done)."""
    req.kv_written = max(req.kv_written, item.q_start + item.q_len)
    return item.q_start == req.block_start and req.masked_block == 0


def after_denoise(req: Request) -> bool:
    """After a denoising step: [0, block start) is stored now (a fused window wrote it); the
    block is done when fused and no mask is left (its K/V rides on the next block's forward)."""
    req.block_step += 1
    req.kv_written = max(req.kv_written, req.block_start)
    return req.fused_store and req.masked_block == 0
