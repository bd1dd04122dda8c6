"""Typed records passed between the engine's stages (vLLM `v1/core/sched/output.py` style).

`schedule()` -> `SchedulerOutput` -> `runner.run()` -> `RunnerOutput` -> `scheduler.update()`
-> `RequestOutput`s. Plain ints and lists only: these records may cross process boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Kinds of forward a scheduled request takes part in this step.
FULL = "full"        # no KV cache: the whole canvas is the query window (exact reference)
REFRESH = "refresh"  # first forward of a block: canvas from q_start on, K/V written to the pages
CACHED = "cached"    # later forwards of a block: the window attends to the cached K/V


@dataclass
class ScheduledRequest:
    request_id: str
    kind: str                     # FULL | REFRESH | CACHED
    q_start: int                  # canvas position of the first query row
    q_len: int                    # query rows (tokens) of this request's forward
    kv_len: int                   # keys this request's queries attend to: canvas positions [0, kv_len)
    candidates: list[int]         # canvas positions (masked) whose logits are decoded this step
    quota: float                  # the schedule's commit count for this step (Dream origin: a probability)
    schedule_step: int            # index of this step in the block's schedule (Dream's t[i])
    schedule_len: int             # steps of the block's schedule
    force_position: int | None = None   # Fast-dLLM Dream refresh: commit this position by argmax only


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
class RunnerOutput:
    # per request id: canvas positions committed this step (subset of its candidates, >= 1
    # unless the fixed quota is 0) and the token committed at each of them
    committed: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    forward_ms: float = 0.0       # wall time of the model forwards (ms)
    sample_ms: float = 0.0        # wall time of propose + policy for all requests (ms)
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
