"""`ModelRunner`: one batched forward per kind of window per step, decided and committed on the device.

Groups (docs/engine.md): FULL (no cache: whole canvases), REFRESH (a block's first forward:
canvas from q_start, K/V written to the pages) and CACHED (the block's later forwards against
the pages). Keeping them in separate forwards keeps a 32-token cached window from being padded
to a 768-token canvas. Per group: pack the rows' integers on the host (one host -> device
copy), expand them on the device against the resident `InputBatch`, forward, sample and commit
there; then the whole step's results come back in ONE device -> host copy. Rows are
right-padded to the widest window of their group; a key mask (only when some row is shorter)
hides every key past a row's canvas, so each row computes what it would alone.
"""
from __future__ import annotations

import time

import torch

from ..models.spec import ModelSpec
from . import revocable, sampler, stateful
from .graph_runner import GraphRunner
from .input_batch import InputBatch
from .kv_pool import KVPool, to_device
from .outputs import (CACHED, FULL, HYBRID, PREFILL, RunnerOutput, ScheduledRequest,
                      SchedulerOutput, StepCommit)
from .request import Request
from .step_inputs import GroupPlan, WindowCache, expand_group, pack_group


# Policies that run in a forward group of their own (their own commit path)
SPLIT_POLICIES = frozenset(revocable.REVOCABLE + stateful.STATEFUL)


class PhaseTimer:
    """Wall time per phase of the step (ms, summed over the engine's life)."""
    PHASES = ("inputs", "forward", "sample", "commit")

    def __init__(self):
        self.ms = dict.fromkeys(self.PHASES, 0.0)
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.ms[phase] += (now - self._t) * 1e3
        self._t = now


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, pool: KVPool | None,
                 batch: InputBatch, conf_dtype: torch.dtype, exact_ties: bool = False):
        self.model, self.spec, self.pool, self.batch = model, spec, pool, batch
        self.conf_dtype, self.exact_ties = conf_dtype, exact_ties
        self.graphs: GraphRunner | None = None       # set by the engine (EngineConfig.cuda_graphs)
        self.hybrid = None                           # HybridRunner, when the engine has a verifier
        self._requests: dict[str, Request] = {}
        self.klass_slots: stateful.KlassSlots | None = None
        self.family = spec.arch if spec.arch in ("dream", "sdar") else "llada"   # sampler rules
        self.timer = PhaseTimer()
        self.windows = WindowCache()     # device windows reused across a block's steps

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        out = RunnerOutput()
        if sched.is_empty:
            return out
        t0 = time.perf_counter()
        fwd0 = self.timer.ms["forward"]
        self._requests = requests
        if sched.admitted:                       # admission rewrote slot rows
            self.windows.clear()
        gen_width = max(requests[i.request_id].params.max_tokens for i in sched.scheduled)
        packs, order = [], []
        for items in self._groups(sched.scheduled):
            plan = pack_group(items, requests, self.family, self.conf_dtype, gen_width)
            packs.append(self._run_group(plan))
            order.extend(items)
            out.num_forwards += 1
        host = torch.cat(packs).cpu() if len(packs) > 1 else packs[0].cpu()   # the one D2H copy
        out.committed = unpack(host, order, requests)
        out.forward_ms = self.timer.ms["forward"] - fwd0
        out.sample_ms = (time.perf_counter() - t0) * 1e3 - out.forward_ms
        return out

    def _run_group(self, plan: GroupPlan) -> torch.Tensor:
        t = self.timer
        t.start()
        inputs = expand_group(plan, self.batch, self.pool, self.spec, self.windows)
        if plan.revocable:                       # WINO: the block's shadow after the window
            inputs = revocable.with_shadow(plan, inputs, self.batch,
                                           self.pool if plan.kind != FULL else None,
                                           to_device(plan.meta, self.batch.device))
        t.lap("inputs")
        if self.graphs is not None and plan.kind == CACHED and self.graphs.accepts(plan, inputs):
            logits = self.graphs.forward(plan, inputs)                      # static / CUDA graph
        else:
            logits = self.model(inputs.input_ids, positions=inputs.positions,
                                attn_bias=inputs.attn_mask, kv=inputs.kv,
                                logits_index=inputs.logits_index)           # (B, n_max, V)
        t.lap("forward")
        if plan.kind == PREFILL:                 # a refresh chunk decodes nothing
            return sampler.snapshot(self.batch, inputs)
        if plan.revocable:
            packed = revocable.decide_and_commit(logits, plan, inputs, self.batch, self.spec)
            t.lap("sample")
            return packed
        if plan.stateful:                        # KLASS: state per block position, by slot
            if self.klass_slots is None:
                self.klass_slots = stateful.KlassSlots(self.batch)
            commit_mask, tokens = stateful.decide_klass(
                logits, plan, inputs, self.klass_slots, to_device(plan.meta, self.batch.device),
                self.spec)
            t.lap("sample")
            packed = sampler.commit(self.batch, inputs, commit_mask, tokens)
            t.lap("commit")
            return packed
        if plan.kind == HYBRID:                  # drafts verified by the causal model
            packed = self.hybrid.decide(plan, inputs, logits, self._requests)
            t.lap("sample")
            return packed
        commit_mask, tokens = sampler.sample(logits, plan, inputs, self.spec, self.exact_ties)
        t.lap("sample")
        packed = sampler.commit(self.batch, inputs, commit_mask, tokens)
        t.lap("commit")
        return packed

    @staticmethod
    def _groups(items: list[ScheduledRequest]) -> list[list[ScheduledRequest]]:
        by_kind: dict[tuple, list[ScheduledRequest]] = {}
        for item in items:                       # hybrid groups: one per decoding rule
            split = item.kind == HYBRID or item.policy in SPLIT_POLICIES
            key = (item.kind, item.policy if split else "")
            group = by_kind.get(key)
            if group is None:
                by_kind[key] = [item]
            else:
                group.append(item)
        return list(by_kind.values())


def unpack(host: torch.Tensor, items: list[ScheduledRequest], requests: dict[str, Request]
           ) -> dict[str, StepCommit]:
    """The step's (B, 2 + W) host copy -> per request: counts and a view of its generation."""
    arr = host.numpy()
    counts = arr[:, :2].tolist()
    out = {}
    for item, (n, n_in), row in zip(items, counts, arr):
        rid = item.request_id
        out[rid] = StepCommit(n, n_in, row[2:2 + requests[rid].params.max_tokens])
    return out
