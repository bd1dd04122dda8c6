"""`Scheduler`: who runs this step, and what a step's commits do to each request (no CUDA).

FIFO waiting queue -> running set (admission by `max_num_seqs`, the step's token budget and
free KV pages) -> finished (first done, first out; pages freed at once). Requests are never
preempted: a request's pages cover its whole canvas and are reserved at admission, because a
diffusion canvas has a fixed size from the start.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from typing import Callable, Optional

from . import step_plan
from .config import EngineConfig
from . import block_plan, hybrid_plan
from .block_plan import BLOCK
from .outputs import (CACHED, FULL, HYBRID, PREFILL, REFRESH, RequestOutput, RunnerOutput, ScheduledRequest,
                      SchedulerOutput)
from .page_allocator import PageAllocator, page_hash_chain
from .request import Request, RequestStatus

# (request, generated token ids so far) -> number of them to keep when a stop string occurs
StopChecker = Callable[[Request, list[int]], Optional[int]]
# The device side of admission and release (the engine's InputBatch): request -> its slot
SlotHooks = tuple[Callable[[Request], int], Callable[[Request], None]]


def _counting_slots() -> SlotHooks:
    """Slots for a scheduler without a device (tests): the lowest free number."""
    free: list[int] = []
    used: set[int] = set()

    def take(req: Request) -> int:
        slot = free.pop() if free else len(used) + len(free)
        used.add(slot)
        return slot

    def give(req: Request) -> None:
        used.discard(req.slot)
        free.append(req.slot)
    return take, give


# Running requests are served least-recently-scheduled first, then in arrival order
_FAIRNESS = operator.attrgetter("last_scheduled", "arrival")


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: PageAllocator, max_model_len: int,
                 stop_token_ids: tuple[int, ...] = (), stop_checker: StopChecker | None = None,
                 slots: SlotHooks | None = None):
        self.config = config
        self.take_slot, self.release_slot = slots or _counting_slots()
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_checker = stop_checker
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.step_count = 0
        self.num_finished = 0
        self.num_aborted = 0
        self.total_nfe = 0            # forwards summed over requests (one per request per step)
        self.total_nfe_saved = 0      # forwards skipped by early exit
        self.total_generated = 0      # generated tokens returned by finished requests

    # ---- intake -----------------------------------------------------------------------------
    def pages_needed(self, req: Request) -> int:
        return math.ceil(req.canvas_len / self.config.page_size) if self.config.uses_kv_cache else 0

    def add(self, req: Request) -> None:
        """Queue a request; reject at once what could never run."""
        if req.request_id in self.running or any(r.request_id == req.request_id for r in self.waiting):
            raise ValueError(f"request_id={req.request_id!r} is already in the engine: use a unique id")
        if req.canvas_len > self.max_model_len:
            raise ValueError(f"prompt ({req.prompt_len} tokens) + max_tokens ({req.params.max_tokens})"
                             f" = {req.canvas_len} exceeds max_model_len={self.max_model_len}: "
                             "shorten the prompt or lower max_tokens")
        # the widest window that cannot be split: the canvas, or with chunked refreshes the
        # generation (a refresh's last piece runs from the active block to the canvas end)
        widest = req.params.max_tokens if self.config.chunked_refresh else req.canvas_len
        if req.kv_mode == BLOCK and self.config.chunked_refresh:     # a stored block + the next
            widest = 2 * req.params.block_length
        if widest > self.config.max_num_batched_tokens:
            raise ValueError(f"a window of {widest} tokens exceeds EngineConfig.max_num_batched_"
                             f"tokens={self.config.max_num_batched_tokens}: raise the budget"
                             + ("" if self.config.chunked_refresh else " or set chunked_refresh"))
        if self.pages_needed(req) > self.allocator.num_pages:
            raise ValueError(f"canvas of {req.canvas_len} tokens needs {self.pages_needed(req)} KV pages,"
                             f" the pool has {self.allocator.num_pages}: raise kv_cache_memory_gb")
        req.status = RequestStatus.WAITING
        req.kv_mode = req.kv_mode or self.config.kv_cache_mode
        req.prefix_keys = self._prefix_keys(req) if req.kv_mode != "none" else []
        self.waiting.append(req)

    def _prefix_keys(self, req: Request) -> list[bytes]:
        """Keys of the prompt pages that get frozen: full pages before the last prompt position
        (its query row predicts the first generated token under Dream's shift) and before any
        mask inside the prompt (masked positions are not committed)."""
        if not self.config.enable_prefix_caching:
            return []
        size = self.config.page_size
        prompt = req.prompt_token_ids
        if req.kv_mode == BLOCK:        # block diffusion: block_plan.prefix_pages
            return page_hash_chain(prompt, size, block_plan.prefix_pages(req, size))
        first_mask = next((i for i, t in enumerate(prompt) if t == req.mask_token_id), len(prompt))
        num = min((len(prompt) - 1) // size, first_mask // size)
        return page_hash_chain(prompt, size, num)

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Invariant: each running request holds pages for its whole canvas and has committed
        tokens (prompt + finished blocks) and one active block, some of it still masked; each
        step runs one forward per kind of window over the scheduled requests' windows and
        commits at least one position per block (a fixed schedule's zero quota excepted); a block
        with no masks left (or at the end of its bounded schedule) is committed and the next
        opens, or the request finishes and frees its pages in the same update. Running requests
        are served least-recently-scheduled first, cached windows before refreshes, while their
        windows fit the token budget (`num_batched_tokens` <= max_num_batched_tokens); a refresh
        that does not fit runs a PREFILL chunk of what is left when `chunked_refresh` is on.
        Then waiting requests are admitted in arrival order while `len(running)` < max_num_seqs,
        their first window (or, chunked, a first chunk) fits the budget left and their pages are
        free. The head of the queue blocks the rest (strict FIFO)."""
        self.step_count += 1
        out = SchedulerOutput(step=self.step_count)
        budget = self.config.max_num_batched_tokens
        refresh = self.config.refresh
        cached, others = [], []
        for req in sorted(self.running.values(), key=_FAIRNESS):
            item = step_plan.plan(req, req.kv_mode, refresh)
            (cached if item.kind == CACHED else others).append((req, item))
        for req, item in cached + others:
            budget -= self._fit(out, req, item, budget)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._can_admit(req, budget):
                break
            self.waiting.popleft()
            self._admit(req)
            out.admitted.append(req.request_id)
            budget -= self._fit(out, req, self._plan(req), budget)
        return out

    def _plan(self, req: Request) -> ScheduledRequest:
        return step_plan.plan(req, req.kv_mode, self.config.refresh)

    def _fit(self, out: SchedulerOutput, req: Request, item: ScheduledRequest, budget: int) -> int:
        """Schedule `item` if it fits the budget (or a chunk of it); returns the tokens taken."""
        if item.q_len <= budget:
            return self._take(out, req, item)
        if self.config.chunked_refresh and req.kv_mode == BLOCK:
            chunk = block_plan.prefill_chunk(req, item, budget)
            if chunk is not None:
                return self._take(out, req, chunk)
        elif self.config.chunked_refresh and item.kind == REFRESH:
            chunk = step_plan.refresh_chunk(req, item, budget, self.config.page_size)
            if chunk is not None:
                return self._take(out, req, chunk)
        return 0

    def _take(self, out: SchedulerOutput, req: Request, item: ScheduledRequest) -> int:
        out.scheduled.append(item)
        out.num_batched_tokens += item.q_len
        req.last_scheduled = self.step_count
        return item.q_len

    def _can_admit(self, req: Request, budget: int) -> bool:
        hit = len(self.allocator.match(req.prefix_keys)) * self.config.page_size
        first_window = req.canvas_len - (hit if self.config.uses_kv_cache else 0)
        if self.config.chunked_refresh and req.kv_mode == BLOCK:
            first_window = min(first_window, 2 * req.params.block_length)  # a first chunk
        elif self.config.chunked_refresh and req.block_start - hit >= self.config.page_size:
            first_window = min(first_window, self.config.page_size)       # a first chunk
        return (first_window <= budget
                and self.allocator.can_allocate(self.pages_needed(req), req.prefix_keys))

    def _admit(self, req: Request) -> None:
        pages, hits = self.allocator.allocate(self.pages_needed(req), req.prefix_keys)
        req.page_ids = pages
        req.num_cached_tokens = hits * self.config.page_size
        req.num_frozen_tokens = len(req.prefix_keys) * self.config.page_size
        req.status = RequestStatus.RUNNING
        req.slot = self.take_slot(req)
        if req.kv_mode == BLOCK:        # the prefix cache's pages hold the first K/V already
            req.kv_written = req.num_cached_tokens
        self.running[req.request_id] = req
        step_plan.open_block(req, req.kv_mode)

    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Apply each scheduled request's commits; close finished blocks and requests."""
        outputs = []
        running, committed = self.running, result.committed
        for item in sched.scheduled:
            req = running.get(item.request_id)
            if req is None:          # aborted while its forward ran
                continue
            c = committed.get(item.request_id)
            n_committed = 0
            if c is not None:
                n_committed = c.num_committed
                req.masked_block -= c.num_in_block
                req.masked_before -= n_committed - c.num_in_block
                if req.params.refresh_on:      # "content": the next step refreshes
                    if item.kind == REFRESH and req.block_step and step_plan.content_only(req):
                        req.content_refreshes += 1
                    req.content_committed = n_committed > 0 and step_plan.committed_content(
                        req, c.generated, item.cand_start - req.prompt_len,
                        item.cand_end - req.prompt_len, self.stop_token_ids)
                req.generated = c.generated
            req.nfe += 1
            self.total_nfe += 1
            if req.kv_mode == BLOCK:           # block diffusion: denoising steps and stores
                outputs.extend(self._after_block_step(req, item))
                continue
            if item.kind == CACHED:            # the common step: counters only
                if step_plan.after_step(req, item, n_committed, req.kv_mode):
                    outputs.append(self._close_block(req))
                continue
            if item.kind == HYBRID:            # left to right: stream every committed span
                outputs.append(self._after_hybrid(req, item, n_committed))
                continue
            if item.kind == PREFILL:           # a refresh chunk: K/V written, nothing decoded
                req.refresh_from = item.q_start + item.q_len
                req.kv_written = max(req.kv_written, req.refresh_from)
                continue
            if item.kind in (REFRESH, FULL):
                req.kv_written = req.canvas_len
            if item.kind == REFRESH and not req.prefix_published:
                self._publish(req)
            if step_plan.after_step(req, item, n_committed, req.kv_mode):
                outputs.append(self._close_block(req))
        return outputs

    def _after_block_step(self, req: Request, item: ScheduledRequest) -> list[RequestOutput]:
        """Block diffusion: a storing forward or a denoising step; the prompt pages go to the
        prefix cache once their K/V is written; a done block closes."""
        if item.kind == PREFILL:
            done = block_plan.after_store(req, item)
        else:
            done = block_plan.after_denoise(req)
        if not req.prefix_published and req.kv_written >= req.num_frozen_tokens:
            self._publish(req)
        return [self._close_block(req)] if done else []

    def _after_hybrid(self, req: Request, item: ScheduledRequest, n: int) -> RequestOutput:
        """Advance a hybrid request; finish it at a stop token, at the canvas end, or (APD with
        EOS in the prompt) after its first step, as the official loop does."""
        hybrid_plan.after_hybrid_step(req, item, n)
        req.masked_block = req.canvas_len - req.curr
        cut = self._stop_cut(req)
        if cut is not None and cut <= req.curr - req.prompt_len:
            req.output_len = cut
            self._finish(req, "stop")
        elif req.curr >= req.canvas_len:
            self._finish(req, "length")
        elif req.stop_after_step:
            req.output_len = req.curr - req.prompt_len
            self._finish(req, "stop")
        return self.make_output(req)

    def _publish(self, req: Request) -> None:
        hit = req.num_cached_tokens // self.config.page_size
        n = len(req.prefix_keys)
        self.allocator.publish(req.page_ids[hit:n], req.prefix_keys[hit:n])
        req.prefix_published = True

    def _close_block(self, req: Request) -> RequestOutput:
        last = req.block_idx == req.num_blocks - 1
        cut = self._stop_cut(req)
        step_plan.next_block(req)
        if cut is not None and req.output_len is None:
            req.output_len = cut
        if cut is not None and (req.params.early_exit or last):
            req.nfe_saved = (req.num_blocks - req.block_idx) * req.steps_per_block
            self._finish(req, "stop")
        elif last:
            self._finish(req, "length")
        else:
            step_plan.open_block(req, req.kv_mode)
        return self.make_output(req)

    def _stop_cut(self, req: Request) -> int | None:
        """Generated tokens to keep if EOS/EOT or a stop string occurs in what is committed."""
        gen = req.generated_tokens(req.block_end - req.prompt_len)
        cuts = [next((i for i, t in enumerate(gen) if t in self.stop_token_ids), None)]
        if self.stop_checker is not None and req.params.stop:
            cuts.append(self.stop_checker(req, gen))
        cuts = [c for c in cuts if c is not None]
        return min(cuts) if cuts else None

    # ---- leaving ----------------------------------------------------------------------------
    def _finish(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req.output_len is None and reason == "length":
            req.output_len = req.params.max_tokens
        if self.running.pop(req.request_id, None) is not None:
            self.release_slot(req)
        self.allocator.free(req.page_ids)
        req.page_ids = []
        self.num_finished += 1
        self.total_nfe_saved += req.nfe_saved
        self.total_generated += len(req.generated_ids())

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a waiting or running request at any time; None if it is unknown or done."""
        req = self.running.get(request_id)
        if req is not None:
            self.num_aborted += 1
            self._finish(req, "abort")
            return self.make_output(req)
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self.num_aborted += 1
                req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
                return self.make_output(req)
        return None

    def make_output(self, req: Request) -> RequestOutput:
        """Token-level output (text is attached by the engine, which owns the tokenizer)."""
        ids = req.generated_ids()
        delta = ids[req.num_emitted:]
        req.num_emitted = len(ids)
        return RequestOutput(
            request_id=req.request_id, text="", delta_text="", token_ids=ids, delta_token_ids=delta,
            finished=req.is_finished, finish_reason=req.finish_reason, nfe=req.nfe,
            num_prompt_tokens=req.prompt_len, nfe_saved=req.nfe_saved,
            num_cached_tokens=req.num_cached_tokens, num_masks_left=req.num_masks_left,
            verifier_forwards=req.verifier_forwards)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        return {"num_waiting": len(self.waiting), "num_running": len(self.running),
                "num_steps": self.step_count, "num_finished": self.num_finished,
                "num_aborted": self.num_aborted,
                "total_nfe": self.total_nfe, "total_nfe_saved": self.total_nfe_saved,
                "total_generated_tokens": self.total_generated, **self.allocator.stats()}
