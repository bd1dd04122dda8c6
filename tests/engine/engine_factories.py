"""Factory helpers for engine tests without a model: requests, schedulers, hand-written outputs."""
from __future__ import annotations

import itertools

from dfastllm_ray.engine.config import EngineConfig
from dfastllm_ray.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput, StepCommit
from dfastllm_ray.engine.page_allocator import PageAllocator
from dfastllm_ray.engine.request import Request
from dfastllm_ray.engine.scheduler import Scheduler
from dfastllm_ray.sampling.params import SamplingParams

MASK, EOS, TOKEN = 99, 98, 7
_arrivals = itertools.count()
_LIVE: dict[str, Request] = {}       # the newest request made under each id (for hand outputs)


def make_request(rid: str, prompt_len: int = 12, max_tokens: int = 16, block_length: int = 8,
                 steps: int | None = None, prompt: list[int] | None = None, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, block_length=block_length,
                        steps=steps or max_tokens, **params).resolve()
    ids = prompt if prompt is not None else [(i % 50) + 1 for i in range(prompt_len)]
    _LIVE[rid] = Request(rid, list(ids), sp, MASK, next(_arrivals))
    return _LIVE[rid]


def host_canvas(req: Request) -> list[int]:
    """The request's canvas as the host last saw it (prompt + generation snapshot)."""
    return req.prompt_token_ids + req.generated_tokens(req.params.max_tokens)


def candidates(item: ScheduledRequest) -> list[int]:
    """The masked canvas positions a step's candidates are, as the device computes them."""
    if item.force_position is not None:
        return [item.force_position]
    canvas = host_canvas(_LIVE[item.request_id])
    return [p for p in range(item.cand_start, item.cand_end) if canvas[p] == MASK]


def committed(item: ScheduledRequest, positions: list[int], tokens: list[int]) -> StepCommit:
    """A hand-written StepCommit: `tokens` written at canvas `positions`."""
    req = _LIVE[item.request_id]
    gen = req.generated_tokens(req.params.max_tokens)
    for p, t in zip(positions, tokens):
        gen[p - req.prompt_len] = t
    in_block = sum(1 for p in positions if p >= req.block_start)
    return StepCommit(len(positions), in_block, gen)


def make_scheduler(num_pages: int = 64, page_size: int = 4, **cfg) -> Scheduler:
    config = EngineConfig(page_size=page_size, num_pages=num_pages, **cfg)
    pages = num_pages if config.uses_kv_cache else 0
    alloc = PageAllocator(pages, page_size, config.enable_prefix_caching)
    return Scheduler(config, alloc, max_model_len=4096, stop_token_ids=(EOS,))


def commit_quota(sched: SchedulerOutput, token=TOKEN, eos_at: dict | None = None) -> RunnerOutput:
    """Hand-written model output: each request commits its first max(quota, 1) candidates with
    `token`, or EOS at the canvas positions listed in eos_at[request_id]."""
    out = RunnerOutput()
    for item in sched.scheduled:
        pos = candidates(item)[:max(int(item.quota), 1)]
        eos = (eos_at or {}).get(item.request_id, ())
        out.committed[item.request_id] = committed(item, pos, [EOS if p in eos else token for p in pos])
    return out


def run_to_completion(s: Scheduler, max_steps: int = 1000, **kw) -> dict:
    """Drive schedule -> hand-written output -> update; returns the final output per request."""
    finals = {}
    for _ in range(max_steps):
        if not s.has_unfinished():
            break
        sched = s.schedule()
        for o in s.update(sched, commit_quota(sched, **kw)):
            if o.finished:
                finals[o.request_id] = o
    return finals
