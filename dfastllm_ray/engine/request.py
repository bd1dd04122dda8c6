"""`Request`: one generation's host-side state inside the engine (no CUDA).

A request's *canvas* is its prompt followed by `max_tokens` generation positions, all masked at
arrival. Generation proceeds block by block (`block_length` positions); `block_step` counts the
forwards spent on the active block. Committed positions never change again.

The canvas itself lives on the device (`InputBatch`, row `slot`). The host keeps counters of
the masks left (enough to plan every step) and `generated`, the snapshot of the generation
positions that the step's one device -> host copy brought back, read only when a block closes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

from ..sampling.dream import ThresholdCarry
from ..sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams            # resolved: max_tokens, block_length, steps are set
    mask_token_id: int
    arrival: int                      # engine-wide arrival counter (FIFO order)
    status: RequestStatus = RequestStatus.WAITING
    block_idx: int = 0                # index of the active block, 0..num_blocks-1
    block_step: int = 0               # forwards already spent on the active block
    block_quota: list[int] = field(default_factory=list)  # fixed schedule: commits per step of the block
    carry: ThresholdCarry | None = None   # Dream no-cache confidence_threshold schedule state
    nfe: int = 0                      # model forwards this request took part in
    nfe_saved: int = 0                # forwards skipped by early exit (fixed-schedule estimate)
    page_ids: list[int] = field(default_factory=list)     # KV pages covering the canvas, in order
    num_cached_tokens: int = 0        # leading prompt positions whose K/V came from the prefix cache
    num_frozen_tokens: int = 0        # leading prompt positions never recomputed after the first refresh
    prefix_keys: list[bytes] = field(default_factory=list)  # hash-chain keys of the frozen prompt pages
    prefix_published: bool = False    # frozen pages written and offered to the prefix cache
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    output_len: int | None = None     # generated positions returned (cut at EOS / stop string)
    num_emitted: int = 0              # generated positions already streamed
    last_scheduled: int = -1          # engine step index this request last ran in (fairness)
    seed: int = 0                     # counter-RNG key (params.seed, or drawn at arrival)
    slot: int = -1                    # InputBatch row while running
    masked_before: int = 0            # masks in canvas [0, block_start): prompt masks, leftovers
    masked_block: int = 0             # masks in the active block
    generated: Sequence[int] | None = None   # generation positions at the last sync (None: all masks)
    refresh_from: int = 0             # chunked refresh: canvas position the block's refresh resumes at
    content_committed: bool = False   # refresh_on "content": the last step committed a non-EOS token
    content_refreshes: int = 0        # refresh_on "content": refreshes it triggered so far
    kv_written: int = 0               # canvas positions [0, kv_written) hold K/V in the pages
    kv_mode: str = ""                 # this request's KV cache mode ("": the engine's default)
    fused_store: bool = False         # block diffusion: a block's K/V is stored by the next one's forward
    curr: int = 0                     # hybrid: first masked canvas position (left to right)
    prev_accept: int = 0              # hybrid: tokens committed by the previous step
    v_len: int = 0                    # hybrid: canvas positions held in the verifier's cache
    draft_k: int = 0                  # speculative: positions to draft next step
    verifier_forwards: int = 0        # hybrid: verifier forwards so far
    drafter_cache: bool = False       # APD: the drafter config's `use_cache` (kv_window applies)
    stop_after_step: bool = False     # APD: EOS in the prompt stops after one step (official quirk)
    sampler_flags: int = -1           # the batched sampler's facts of params (step_inputs.row_flags)
    # Shape of the canvas, fixed at arrival (prompt and resolved params never change); plain
    # attributes, not properties: every step reads them for every request
    prompt_len: int = field(init=False, default=0)        # prompt tokens
    canvas_len: int = field(init=False, default=0)        # prompt + max_tokens positions
    num_blocks: int = field(init=False, default=0)        # max_tokens // block_length
    steps_per_block: int = field(init=False, default=0)   # steps // num_blocks
    block_origin: int = field(init=False, default=0)      # where block 0 starts: the prompt's end,
                                                          # or (block diffusion) its block's start

    def __post_init__(self) -> None:
        p = self.params
        self.prompt_len = len(self.prompt_token_ids)
        self.canvas_len = self.prompt_len + p.max_tokens
        self.num_blocks = p.max_tokens // p.block_length
        self.steps_per_block = p.steps // self.num_blocks
        self.masked_before = sum(1 for t in self.prompt_token_ids if t == self.mask_token_id)
        self.masked_block = p.block_length
        self.block_origin = self.prompt_len
        if p.block_diffusion:    # SDAR: blocks at multiples of B, the prompt's tail in block 0
            self.block_origin -= self.prompt_len % p.block_length
            self.num_blocks = (self.canvas_len - self.block_origin) // p.block_length
            self.steps_per_block = p.steps // self.num_blocks
            self.masked_block = self.block_origin + p.block_length - self.prompt_len

    # ---- shape of the canvas -------------------------------------------------------------
    @property
    def block_start(self) -> int:
        return self.block_origin + self.block_idx * self.params.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    # ---- state ------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def masked_upto_block_end(self) -> int:
        return self.masked_before + self.masked_block

    def generated_tokens(self, end: int) -> list[int]:
        """The first `end` generation positions at the last sync (masks included)."""
        if self.generated is None:
            return [self.mask_token_id] * end
        span = self.generated[:end]
        return span.tolist() if hasattr(span, "tolist") else [int(t) for t in span]

    def returned_span(self) -> list[int]:
        """The generation positions returned so far: cut at `output_len`, masks included."""
        if self.output_len is not None:
            end = self.output_len
        elif self.params.is_hybrid:               # left to right: every committed token
            end = self.curr - self.prompt_len
        else:                                     # the finished blocks' generation positions
            end = max(self.block_start - self.prompt_len, 0)
        return self.generated_tokens(end)

    def generated_ids(self) -> list[int]:
        """Generated positions returned to the user: the returned span with masks dropped
        (a bounded dual-cache block may leave masks, as in Fast-dLLM)."""
        return [t for t in self.returned_span() if t != self.mask_token_id]

    @property
    def num_masks_left(self) -> int:
        """Positions of the returned span left masked (Fast-dLLM's bounded dual-cache blocks)."""
        return sum(1 for t in self.returned_span() if t == self.mask_token_id)
