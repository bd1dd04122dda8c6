"""Typed records passed between the engine's stages (vLLM `v1/core/sched/output.py` style).

`schedule()` -> `SchedulerOutput` -> `runner.run()` -> `RunnerOutput` -> `scheduler.update()`
-> `RequestOutput`s. Plain ints and lists only: these records may cross process boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# Kinds of forward a scheduled request takes part in this step.
FULL = "full"        # no KV cache: the whole canvas is the query window (exact reference)
REFRESH = "refresh"  # first forward of a block: canvas from q_start on, K/V written to the pages
CACHED = "cached"    # later forwards of a block: the window attends to the cached K/V
PREFILL = "prefill"  # K/V written, nothing decoded: a chunk of a refresh too large for the step's
                     # budget, or block diffusion's prompt prefill / storing forward (block_plan.py)
HYBRID = "hybrid"    # APD / speculative: a drafter window, then a verifier forward over the draft


@dataclass
class ScheduledRequest:
    request_id: str
    kind: str                     # FULL | REFRESH | CACHED | PREFILL | HYBRID
    q_start: int                  # canvas position of the first query row
    q_len: int                    # query rows (tokens) of this request's forward
    kv_len: int                   # keys this request's queries attend to: canvas positions [0, kv_len)
    cand_start: int               # candidates: the masked canvas positions in [cand_start, cand_end)
    cand_end: int
    num_candidates: int           # how many there are (the host's mask count; the device agrees)
    quota: float                  # the schedule's offer for this step (Dream origin: a probability)
    k: int                        # commit count of top-k style policies (0: this step commits none)
    policy: str                   # batched policy name (sampling.batch_policies) for this step
    schedule_step: int            # index of this step in the block's schedule (Dream's t[i])
    schedule_len: int             # steps of the block's schedule
    slot: int = -1                # the request's InputBatch row
    conf_alg: str | None = None   # Dream confidence for this step (Fast-dLLM's cached steps: entropy)
    force_position: int | None = None   # Fast-dLLM Dream refresh: commit this position by argmax only
    v_start: int = 0              # hybrid: first canvas position of the verifier's new rows


@dataclass
class SchedulerOutput:
    step: int                                     # engine step index
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch-row order
    num_batched_tokens: int = 0                   # sum of q_len (tokens)
    admitted: list[str] = field(default_factory=list)   # request ids started this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class StepCommit:
    """What one request's step committed, from the step's single device -> host copy."""
    num_committed: int            # positions committed this step (0 only for a zero quota)
    num_in_block: int             # of them, inside the active block (the rest: earlier masks)
    generated: Sequence[int]      # the generation positions after the step (masks included)


@dataclass
class RunnerOutput:
    committed: dict[str, StepCommit] = field(default_factory=dict)   # per request id
    forward_ms: float = 0.0       # wall time of the model forwards (ms)
    sample_ms: float = 0.0        # wall time of inputs, sampling, commit and the copy (ms)
    num_forwards: int = 0         # batched model forwards this step (one per kind group)


@dataclass
class RequestOutput:
    request_id: str
    text: str                     # generated text so far (cut before EOS / stop string)
    delta_text: str               # text added since the previous output of this request
    token_ids: list[int]          # generated token ids so far (real tokens only, no EOS / masks)
    delta_token_ids: list[int]    # token ids added since the previous output
    finished: bool
    finish_reason: str | None     # "stop" | "length" | "abort" | None while running
    nfe: int                      # model forwards spent on this request (NFE)
    num_prompt_tokens: int
    nfe_saved: int = 0            # forwards skipped by early exit (fixed-schedule count)
    num_cached_tokens: int = 0    # prompt tokens served from the prefix cache
    num_masks_left: int = 0       # returned positions still masked (dropped from token_ids)
    verifier_forwards: int = 0    # hybrid decoding: forwards of the verifier (nfe: the drafter's)
