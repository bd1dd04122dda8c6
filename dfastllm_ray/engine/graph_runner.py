"""`GraphRunner`: the cached-window forward on static buffers, replayed as a CUDA graph.

A dual-cache step's shapes are nearly fixed: B rows of one block (Lq = block length) attending
to at most a canvas of keys. Padded to a *bucket* (B up to the next of `BATCH_BUCKETS`, keys up
to the next power of two >= `MIN_KEYS`, candidates to Lq), every such step of a bucket has the
same shapes, so its forward is captured once as a CUDA graph (nano-vllm `capture_cudagraph`,
gpt-fast's static cache + "reduce-overhead") and replayed: one launch instead of ~50 per layer.

Each step copies its inputs into the bucket's static buffers (padded rows: mask ids, write to
the pool's dump slot, attend to one key only), replays, and slices the first B rows of the
static logits. On CPU the same static-buffer path runs eagerly, so its padding logic is tested
everywhere (tests/engine/test_graph_runner.py: static == dynamic, token for token).
Graphs are captured lazily, the first time a bucket is met (or by `warm_up`), after one eager
run on a side stream; all buckets share one memory pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_pool import KVPool
from .paged_kv import PagedKV
from .step_inputs import GroupInputs, GroupPlan

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_KEYS = 256


def bucket_of(b: int, lq: int, lk: int, n: int) -> tuple[int, int, int, int] | None:
    """(B', Lq, Lk', n') of a cached step, or None when B exceeds the largest bucket."""
    bb = next((x for x in BATCH_BUCKETS if x >= b), None)
    if bb is None:
        return None
    kk = MIN_KEYS
    while kk < lk:
        kk *= 2
    return bb, lq, kk, max(n, lq)


@dataclass
class StaticStep:
    """The buffers of one bucket (B', Lq, Lk', n'), and its captured graph (CUDA only)."""
    ids: Tensor          # (B', Lq) int64
    positions: Tensor    # (B', Lq) int64
    mask: Tensor         # (B', 1, 1, Lk') bool
    read: Tensor         # (B', Lk') int64 pool slots
    write: Tensor        # (B' * Lq,) int64 pool slots (padding: dump)
    index: Tensor        # (B', n') int64 LM-head rows
    logits: Tensor | None = None
    graph: object | None = None


class GraphRunner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, mask_id: int, device: torch.device):
        self.model, self.pool, self.mask_id, self.device = model, pool, mask_id, device
        self.steps: dict[tuple, StaticStep] = {}
        self.use_graphs = device.type == "cuda"
        self.mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.replays = self.captures = 0

    def accepts(self, plan: GroupPlan, inputs: GroupInputs) -> bool:
        """Cached windows with the gather-based hook and a bucket to pad to."""
        return (isinstance(inputs.kv, PagedKV) and not inputs.kv.passthrough
                and bucket_of(len(plan.items), plan.lq, plan.lk, plan.n_max) is not None)

    def forward(self, plan: GroupPlan, inputs: GroupInputs) -> Tensor:
        """(B, n, V) logits of the group, from the bucket's static forward."""
        b, n = len(plan.items), plan.n_max
        key = bucket_of(b, plan.lq, plan.lk, n)
        st = self.steps.get(key) or self._make(key)
        self._fill(st, inputs, b, plan.lk)
        if st.graph is None and self.use_graphs:
            self._capture(st)
        if st.graph is not None:
            st.graph.replay()
            self.replays += 1
            return st.logits[:b, :n]
        return self._run(st)[:b, :n]

    def _make(self, key: tuple) -> StaticStep:
        bb, lq, kk, nn = key
        z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=self.device)  # noqa: E731
        st = StaticStep(ids=z(bb, lq), positions=z(bb, lq),
                        mask=torch.zeros(bb, 1, 1, kk, dtype=torch.bool, device=self.device),
                        read=z(bb, kk), write=z(bb * lq), index=z(bb, nn))
        self.steps[key] = st
        return st

    def _fill(self, st: StaticStep, inputs: GroupInputs, b: int, lk: int) -> None:
        """Copy the step into the static buffers; rows >= b are inert padding."""
        lq, n = inputs.input_ids.shape[1], inputs.logits_index.shape[1]
        st.ids.fill_(self.mask_id)
        st.ids[:b].copy_(inputs.input_ids)
        st.positions.zero_()
        st.positions[:b].copy_(inputs.positions)
        st.mask.zero_()
        st.mask[:, :, :, 0] = True                       # padded rows attend to one key
        if inputs.attn_mask is None:
            st.mask[:b, :, :, :lk] = True
        else:
            st.mask[:b, :, :, :lk].copy_(inputs.attn_mask)
        st.read.fill_(self.pool.dump_slot)
        st.read[:b, :lk].copy_(inputs.kv.read_slots)
        st.write.fill_(self.pool.dump_slot)
        st.write[:b * lq].copy_(inputs.kv.write_slots)
        st.index.zero_()
        st.index[:b, :n].copy_(inputs.logits_index)

    def _run(self, st: StaticStep) -> Tensor:
        kv = PagedKV(self.pool, st.read, st.write, passthrough=False)
        return self.model(st.ids, positions=st.positions, attn_bias=st.mask, kv=kv,
                          logits_index=st.index)

    def _capture(self, st: StaticStep) -> None:
        """One eager run on a side stream (allocator warm-up), then capture into the shared pool."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(st)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            st.logits = self._run(st)
        st.graph = graph
        self.captures += 1
