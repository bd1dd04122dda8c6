"""`HybridRunner`: the device side of APD and speculative requests, batched across requests.

One hybrid group per decoding (APD, speculative) and step. The drafter forward has already run
through the ordinary group machinery (its window's logits at the draft positions); here, in one
op chain for the whole group:
1. drafts for every row (argmax at temperature 0, else an inverse-CDF draw, counter RNG);
2. ONE verifier forward over every row's new tokens (ragged: a prefill on a row's first step,
   then only its draft), causal, against the verifier's own paged KV pool: the new rows' K/V
   are written into the request's verifier pages (append); a rejection just leaves the cache
   length at the committed prefix (truncate: later writes overwrite the rest);
3. acceptance, batched with ragged lengths: APD's mixture rule (`apd_accept_length`, the first
   draft token always kept) or speculative sampling (`speculative_accept`: accepted + 1);
4. the commit scatter into the canvas, and the packed counts + generation for the host.
APD keeps each request's verifier logits for its next first position in a (slots, V) table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.loader import LoadedModel
from ..sampling import rng
from ..sampling.apd import apd_accept_length
from ..sampling.ar_generate import sample_from
from ..sampling.speculative import speculative_accept
from .input_batch import InputBatch
from .kv_pool import KVPool, to_device
from .page_allocator import PageAllocator
from .paged_kv import build_paged_kv
from .request import Request
from .step_inputs import GroupInputs, GroupPlan


class HybridRunner:
    def __init__(self, verifier: LoadedModel, batch: InputBatch, num_pages: int, page_size: int,
                 drafter_vocab: int):
        s = verifier.spec
        if not s.causal:                 # its forward below is causal with an append-only cache
            raise ValueError(f"verifier {verifier.name!r} ({s.arch}) is not a causal LM: hybrid "
                             "decoding verifies drafts with an autoregressive model (e.g. qwen2)")
        if drafter_vocab < s.vocab_size:
            raise ValueError(f"the drafter's vocabulary ({drafter_vocab}) is smaller than the "
                             f"verifier's ({s.vocab_size}): hybrid decoding needs a verifier over "
                             "the drafter's tokenizer")
        self.verifier, self.spec, self.batch = verifier.model, s, batch
        self.pool = KVPool(s.num_layers, num_pages, page_size, s.num_kv_heads, s.head_dim,
                           verifier.dtype, batch.device)
        self.allocator = PageAllocator(num_pages, page_size, False)
        self.page_table = torch.zeros_like(batch.page_table)
        self.next_logits = torch.zeros(batch.num_slots, s.vocab_size, dtype=verifier.dtype,
                                       device=batch.device)          # APD: (slots, V)
        self.page_size = page_size

    # ---- admission -----------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Reserve verifier pages for the whole canvas (a hybrid canvas never grows)."""
        n = -(-req.canvas_len // self.page_size)
        if not self.allocator.can_allocate(n, []):
            raise RuntimeError(f"no free verifier KV pages for request {req.request_id!r}")
        pages, _ = self.allocator.allocate(n, [])
        req.verifier_pages = pages
        self.page_table[req.slot, :n] = to_device(torch.tensor(pages, dtype=torch.long),
                                                  self.batch.device)

    def release(self, req: Request) -> None:
        self.allocator.free(getattr(req, "verifier_pages", []))
        req.verifier_pages = []

    # ---- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def decide(self, plan: GroupPlan, inputs: GroupInputs, d_logits: Tensor,
               requests: dict[str, Request]) -> Tensor:
        """d_logits (B, n, Vd) drafter logits at the draft positions -> packed (B, 2 + W)."""
        items, dev = plan.items, self.batch.device
        hm = to_device(torch.tensor([[it.cand_start, it.v_start, it.cand_end, it.quota,
                                      requests[it.request_id].canvas_len] for it in items],
                                    dtype=torch.float64), dev)                 # one H2D copy
        curr, v_start, v_end, canvas_len = (hm[:, i].long() for i in (0, 1, 2, 4))
        n_draft = v_end - curr                                          # (B,)
        knobs, vv = inputs.knobs, self.spec.vocab_size
        speculative = plan.items[0].policy == "speculative"
        draft, q = self._draft(d_logits, knobs, plan, speculative)
        v_out, saved = self._verify(plan, inputs, draft, curr, v_start, v_end, speculative)
        v_out = v_out.to(d_logits.dtype)
        if speculative:
            # the canvas cannot hold the drafter's mask id as a token: the verifier's law is
            # taken over every other token (a real AR model never predicts a dLLM's [MASK])
            p = _row_probs(self._no_mask(v_out), knobs.temperature, knobs.hot)   # (B, k+1, V)
            u = lambda stream: rng.uniform(knobs.rng_keys, stream)      # noqa: E731
            acc, nxt = speculative_accept(draft, q, p, u(rng.COIN), u(rng.POSITION)[:, 0],
                                          n_draft)
            tokens = torch.cat([draft, nxt[:, None]], dim=1)
            j = torch.arange(tokens.shape[1], device=dev)[None]
            tokens = torch.where(j == acc[:, None], nxt[:, None], tokens)
            count = acc + 1
        else:
            v_logits = torch.where(saved[..., None], self.next_logits[inputs.slot][:, None, :],
                                   v_out)
            count = apd_accept_length(draft, d_logits, v_logits, hm[:, 3], n_draft)
            row = torch.minimum(count, n_draft - 1).clamp(min=0)
            keep = v_logits.gather(1, row[:, None, None].expand(-1, 1, vv))[:, 0]
            self.next_logits.index_copy_(0, inputs.slot, keep)
            tokens = draft
        return self._commit(inputs, tokens, curr, count, canvas_len)

    def _draft(self, d_logits: Tensor, knobs, plan: GroupPlan, speculative: bool
               ) -> tuple[Tensor, Tensor | None]:
        """Drafts (B, n). Speculative: also q (B, n, Vv), the drafter's distributions cut to the
        verifier's vocabulary, the mask id given no mass. APD: sample_with_gumbel's law,
        softmax((l / T) / T) (the temperature enters twice, as the official code)."""
        vv = self.spec.vocab_size
        if speculative:
            q = _row_probs(self._no_mask(d_logits[..., :vv].float()), knobs.temperature, knobs.hot)
            return sample_from(q, rng.uniform(knobs.rng_keys, rng.TOKEN)), q
        greedy = d_logits.argmax(-1)
        if not plan.facts.sampled:
            return greedy, None
        lg = d_logits.float() / knobs.temp_div / knobs.temp_div
        probs = F.softmax(lg, dim=-1)
        drawn = sample_from(probs.double(), rng.uniform(knobs.rng_keys, rng.TOKEN))
        return torch.where(knobs.hot, drawn, greedy), None

    def _no_mask(self, logits: Tensor) -> Tensor:
        """-inf at the drafter's mask id (when it is inside the verifier's vocabulary)."""
        mask_id = self.batch.mask_id
        if mask_id >= logits.shape[-1]:
            return logits
        return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))

    def _verify(self, plan: GroupPlan, inputs: GroupInputs, draft: Tensor, curr: Tensor,
                v_start: Tensor, v_end: Tensor, speculative: bool) -> tuple[Tensor, Tensor]:
        """One causal verifier forward over each row's [v_start, v_end) (the draft written in)
        -> (logits (B, m, V) at the rows predicting each draft position (+ the bonus row for
        speculative), saved (B, m) bool: rows whose prediction is the APD saved logits)."""
        dev = draft.device
        lq = max(it.cand_end - it.v_start for it in plan.items)
        lk = max(it.cand_end for it in plan.items)
        n = draft.shape[1]
        ar = torch.arange(max(lq, lk, n + 1), device=dev)
        pos = v_start[:, None] + ar[:lq]                                  # (B, Lq)
        flat = self.batch.flat_canvas
        base = (inputs.slot * self.batch.row_len)[:, None]
        tok = flat[base + pos.clamp(max=self.batch.max_len)]
        j = pos - curr[:, None]
        in_draft = (j >= 0) & (j < n)
        tok = torch.where(in_draft, draft.gather(1, j.clamp(0, n - 1)), tok)
        tok = torch.where(pos < v_end[:, None], tok, 0)
        keys = ar[:lk]
        mask = (keys[None, None, :] <= pos[:, :, None]) & (keys[None, None, :] < v_end[:, None, None])
        mask = mask[:, None] | (keys == 0)[None, None, None, :]           # padded rows: one key
        kv = build_paged_kv(self.pool, self.page_table[inputs.slot], v_start,
                            v_end - v_start, lq, lk, passthrough=False)
        m = n + 1 if speculative else n
        rows = curr[:, None] - 1 + ar[:m][None] - v_start[:, None]        # (B, m)
        out = self.verifier(tok, positions=pos, attn_bias=mask, kv=kv,
                            logits_index=rows.clamp(0, lq - 1))
        return out, rows < 0

    def _commit(self, inputs: GroupInputs, tokens: Tensor, curr: Tensor, count: Tensor,
                canvas_len: Tensor) -> Tensor:
        """Write tokens[:, :count] at canvas curr.. (never past the canvas) -> packed."""
        j = torch.arange(tokens.shape[1], device=tokens.device)[None]
        pos = curr[:, None] + j
        ok = (j < count[:, None]) & (pos < canvas_len[:, None])
        base = (inputs.slot * self.batch.row_len)[:, None]
        target = torch.where(ok, base + pos.clamp(max=self.batch.max_len),
                             base + self.batch.max_len)                 # the dump column
        self.batch.flat_canvas.index_copy_(0, target.reshape(-1), tokens.reshape(-1))
        n = ok.sum(1)
        return torch.cat((torch.stack((n, n), dim=1), self.batch.flat_canvas[inputs.gen_flat]),
                         dim=1)


def _row_probs(logits: Tensor, temperature: Tensor, hot: Tensor) -> Tensor:
    """Per-row `target_probs`: one-hot argmax where temperature is 0, else softmax(l / T), f64."""
    lg = logits.double()
    onehot = torch.zeros_like(lg).scatter_(-1, lg.argmax(-1, keepdim=True), 1.0)
    t = torch.where(temperature > 0, temperature, 1.0).double().view(-1, 1, 1)
    return torch.where(hot[..., None], torch.softmax(lg / t, dim=-1), onehot)
