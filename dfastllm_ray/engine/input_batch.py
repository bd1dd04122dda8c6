"""`InputBatch`: the running requests' state, resident on the device and indexed by slot.

vLLM v1's persistent input batch, for diffusion: each running request owns one *slot* from
admission to finish. Its canvas (prompt + generation positions), its KV page table and its
decoding knobs are rows of preallocated device tensors; steps read them with index ops and
commit into them with scatters. The host sends only diffs (a new request's row at admission)
and keeps what it must: admission, page ids, counters, and the snapshots of generated tokens the
step's one device -> host copy brings back.

canvas is (S, L + 1): column L is a dump column that padded scatters write to and nothing reads.
"""
from __future__ import annotations

import math

import torch

from ..sampling.batch import CONF_MARGIN, CONF_NEG_ENTROPY, CONF_PROB
from ..sampling.params import SamplingParams, dus_groups
from .kv_pool import to_device
from .paged_attention import PageMap

# Columns of the float64 knob table, one row per slot.
KNOBS = ("temperature", "threshold", "factor", "entropy_bound", "alg_temp", "top_p", "top_k",
         "random_remask", "logits_eos_inf", "conf_eos_eot_inf", "conf_alg", "pc_lambda",
         "exit_high", "exit_low", "block_length", "revoke_threshold", "kl_threshold", "kl_history",
         "dus_groups")
COL = {name: i for i, name in enumerate(KNOBS)}
CONF_ALGS = {None: CONF_PROB, "origin": CONF_PROB, "maskgit_plus": CONF_PROB,
             "topk_margin": CONF_MARGIN, "entropy": CONF_NEG_ENTROPY}


def knob_row(p: SamplingParams) -> list[float]:
    """A request's knobs as one row of the table (NaN where a knob is unset)."""
    nan = float("nan")
    alg = "maskgit_plus" if p.threshold is not None else p.alg       # dream.confidence_alg
    return [p.temperature, nan if p.threshold is None else p.threshold,
            nan if p.factor is None else p.factor,
            nan if p.entropy_bound is None else p.entropy_bound, p.alg_temp or 0.0,
            1.0 if p.top_p is None else p.top_p, float(p.top_k or 0),
            float(p.remasking == "random"), float(p.logits_eos_inf),
            float(p.confidence_eos_eot_inf), float(CONF_ALGS[alg]),
            nan if p.pc_lambda is None else p.pc_lambda,
            nan if p.exit_high is None else p.exit_high,
            nan if p.exit_high is None else p.exit_low_or_default,
            float(p.block_length or 0),
            nan if p.revoke_threshold is None else p.revoke_threshold,
            nan if p.kl_threshold is None else p.kl_threshold,
            nan if p.kl_history is None else float(p.kl_history), dus_groups(p)]



class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, page_size: int, mask_id: int,
                 device: torch.device, page_map: PageMap | None = None):
        self.num_slots, self.max_len, self.page_size = max_num_seqs, max_model_len, page_size
        self.mask_id, self.device = mask_id, device
        self.row_len = max_model_len + 1                             # + the dump column
        self.canvas = torch.full((max_num_seqs, self.row_len), mask_id, dtype=torch.long,
                                 device=device)                      # (S, L + 1)
        self.page_table = torch.zeros(max_num_seqs, max(math.ceil(max_model_len / page_size), 1),
                                      dtype=torch.long, device=device)   # (S, max pages)
        self.knobs = torch.zeros(max_num_seqs, len(KNOBS), dtype=torch.float64, device=device)
        self.seeds = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        # (S, L + 1) pool slot of each canvas position (page table expanded at admission, so a
        # window's KV slots are one gather of the flat canvas index; past the pages: page 0's,
        # keys the attention mask hides) and 0, 1, ... for every window's aranges
        self.kv_slots = torch.zeros(max_num_seqs, self.row_len, dtype=torch.long, device=device)
        self.columns = torch.arange(self.row_len + 1, device=device)
        self._aranges: dict[int, torch.Tensor] = {}
        self._targets: dict[tuple, torch.Tensor] = {}
        self.page_map = page_map        # inverse page tables, for attention_backend="flex"
        self.free = list(range(max_num_seqs - 1, -1, -1))            # a stack: low slots first

    def add(self, prompt: list[int], canvas_len: int, page_ids: list[int], p: SamplingParams,
            seed: int) -> int:
        """Take a slot and write the request's row (one host -> device copy per tensor)."""
        if not self.free:
            raise RuntimeError("no free InputBatch slot: the scheduler admitted more than "
                               "max_num_seqs requests")
        slot = self.free.pop()
        row = torch.full((self.row_len,), self.mask_id, dtype=torch.long)
        row[:len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.canvas[slot] = to_device(row, self.device)
        if page_ids:
            pages = torch.tensor(page_ids, dtype=torch.long)
            self.page_table[slot, :len(page_ids)] = to_device(pages, self.device)
            n = min(len(page_ids) * self.page_size, self.row_len)
            kv = torch.arange(self.row_len) % self.page_size
            kv[:n] += pages.repeat_interleave(self.page_size)[:n] * self.page_size
            self.kv_slots[slot] = to_device(kv, self.device)
            if self.page_map is not None:
                self.page_map.admit(page_ids)
        self.knobs[slot] = to_device(torch.tensor(knob_row(p), dtype=torch.float64), self.device)
        self.seeds[slot] = seed
        return slot

    def arange(self, n: int) -> torch.Tensor:
        """(n,) int64 0..n-1 on the device: a view of `columns`, kept per width (a window
        build reads several; a dict hit costs no op)."""
        ar = self._aranges.get(n)
        if ar is None:
            ar = self._aranges[n] = self.columns.narrow(0, 0, n)
        return ar

    def count_targets(self, b: int, n: int) -> torch.Tensor:
        """(b, n) int64 rows 1..n, contiguous (the candidates' searchsorted queries), kept
        per shape (a handful: batch sizes times range widths)."""
        key = (b, n)
        t = self._targets.get(key)
        if t is None:
            t = self._targets[key] = self.columns[1:n + 1].expand(b, n).contiguous()
        return t

    def release(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def flat_canvas(self):
        """(S * (L + 1),) view: position p of slot s is s * row_len + p."""
        return self.canvas.view(-1)
