"""`ModelRunner`: one batched forward per kind of window per step, then the per-request decisions.

Rows are right-padded to the longest window of their group; an additive key bias hides every
key past a row's canvas, so each row computes what it would alone (up to float rounding of the
larger matmuls). Groups (docs/engine.md): FULL (no cache: whole canvases), REFRESH (a block's
first forward: canvas from q_start, K/V written to the pages) and CACHED (the block's later
forwards against the pages). Keeping them in separate forwards keeps a 32-token cached window
from being padded to a 768-token canvas.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from ..models.spec import ModelSpec
from . import sampler
from .kv_pool import KVPool, to_device
from .outputs import FULL, RunnerOutput, ScheduledRequest, SchedulerOutput
from .paged_kv import build_paged_kv
from .request import Request


def logits_rows(item: ScheduledRequest, logits_shift: bool) -> list[int]:
    """Query rows whose output predicts each candidate position.

    Dream (logits_shift) predicts position p from the output at p-1; the window's first position
    keeps its own output, as Fast-dLLM shifts within the window and the reference over the canvas."""
    rows = []
    for p in item.candidates:
        r = p - item.q_start
        rows.append(r - 1 if logits_shift and r > 0 else r)
    return rows


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, pool: KVPool | None,
                 device: torch.device, dtype: torch.dtype):
        self.model = model
        self.spec = spec
        self.pool = pool
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput, requests: dict[str, Request]) -> RunnerOutput:
        out = RunnerOutput()
        logits: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        for items in self._groups(sched.scheduled):
            batch_logits = self.forward(items, requests)                     # (B, n_max, V)
            for b, item in enumerate(items):
                logits[item.request_id] = batch_logits[b, :len(item.candidates)]
            out.num_forwards += 1
        t1 = time.perf_counter()
        out.committed = sampler.sample(sched.scheduled, requests, logits, self.spec)
        out.forward_ms = (t1 - t0) * 1e3
        out.sample_ms = (time.perf_counter() - t1) * 1e3
        return out

    @staticmethod
    def _groups(items: list[ScheduledRequest]) -> list[list[ScheduledRequest]]:
        by_kind: dict[str, list[ScheduledRequest]] = {}
        for item in items:
            by_kind.setdefault(item.kind, []).append(item)
        return list(by_kind.values())

    def forward(self, items: list[ScheduledRequest], requests: dict[str, Request]) -> Tensor:
        """One padded forward over the items' windows -> logits (B, n_max, V) at the candidates."""
        lq = max(i.q_len for i in items)
        lk = lq if items[0].kind == FULL else max(i.kv_len for i in items)
        ids = torch.full((len(items), lq), self.spec.mask_token_id, dtype=torch.long)
        valid = torch.zeros(len(items), lk, dtype=torch.bool)         # real keys per row
        n_max = max(1, max(len(i.candidates) for i in items))
        index = torch.zeros(len(items), n_max, dtype=torch.long)       # LM-head rows per row
        for b, item in enumerate(items):
            canvas = requests[item.request_id].canvas
            ids[b, :item.q_len] = canvas[item.q_start:item.q_start + item.q_len]
            valid[b, :item.kv_len] = True
            rows = logits_rows(item, self.spec.logits_shift)
            index[b, :len(rows)] = torch.tensor(rows, dtype=torch.long)
        starts = torch.tensor([i.q_start for i in items], dtype=torch.long)
        positions = starts[:, None] + torch.arange(lq)[None]           # (B, Lq) absolute RoPE positions
        valid = to_device(valid, self.device)
        bias = torch.zeros(valid.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~valid, torch.finfo(self.dtype).min)[:, None, None, :]     # (B, 1, 1, Lk)
        kv = None if items[0].kind == FULL else self._paged_kv(items, requests, lq, lk)
        return self.model(to_device(ids, self.device), positions=to_device(positions, self.device),
                          attn_bias=bias, kv=kv, logits_index=to_device(index, self.device))

    def _paged_kv(self, items, requests, lq: int, lk: int):
        windows = [(i.q_start, i.q_len, i.kv_len) for i in items]
        tables = [requests[i.request_id].page_ids for i in items]
        return build_paged_kv(self.pool, windows, tables, lq, lk, self.device)
