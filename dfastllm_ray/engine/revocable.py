"""Revocable decoding in the engine (WINO): a shadow of the active block, commit and re-mask.

A WINO group's candidates are every position of each row's active block (masked, or committed
earlier in the block and still revocable). Its forward carries a *shadow* of the block after
the window: n mask tokens at the block's RoPE positions, whose row j sees every canvas key but
the block's position j, and the shadow (sampling/wino.py `shadow_bias`); no window row sees a
shadow key, and shadow K/V are never written to the pages. The shadow's logits give each
committed token's re-check probability; `wino.wino` decides commits and revocations for the
whole group; the scatter writes tokens where committed and the mask id where revoked.

A block ends only when it has no mask left, and the engine emits a block's tokens only when it
ends, so a revoked token is never streamed (tests/engine/test_engine_wino.py).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.spec import ModelSpec
from ..sampling.batch_policies import Ranked
from ..sampling.batch_propose import propose_batch
from ..sampling.wino import WINO_REVOKE, wino
from .input_batch import InputBatch
from .kv_pool import KVPool
from .paged_kv import PagedKV, _rows, build_paged_kv
from .step_inputs import M, GroupInputs, GroupPlan

REVOCABLE = ("wino",)


class ShadowKV:
    """The paged hook of a window followed by shadow rows: only the window's K/V are written;
    keys = the request's canvas (from the pages) then the shadow's fresh keys."""

    def __init__(self, paged: PagedKV, lq: int):
        self.paged, self.lq = paged, lq

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        pool, lq = self.paged.pool, self.lq
        pool.write(layer, self.paged.write_slots, _rows(k[:, :, :lq]), _rows(v[:, :, :lq]))
        ck, cv = pool.gather(layer, self.paged.read_slots)
        return (torch.cat([ck.to(k.dtype), k[:, :, lq:]], dim=2),
                torch.cat([cv.to(v.dtype), v[:, :, lq:]], dim=2))


def with_shadow(g: GroupPlan, inputs: GroupInputs, batch: InputBatch, pool: KVPool | None,
                meta: Tensor) -> GroupInputs:
    """Append the shadow rows to a WINO group's inputs (ids, positions, mask, hook, LM rows)."""
    dev, n, lq = inputs.input_ids.device, g.n_max, inputs.input_ids.shape[1]
    col = lambda name: meta[:, M[name]].long()                        # noqa: E731
    s, q_start, kv_len = col("block_start"), col("q_start"), col("kv_len")
    blk = col("cand_end") - col("cand_start")                         # (B,) block length
    j = torch.arange(n, device=dev)
    sh_pos = s[:, None] + j                                           # (B, n)
    ids = torch.cat([inputs.input_ids, torch.full_like(sh_pos, batch.mask_id)], dim=1)
    positions = torch.cat([inputs.positions, sh_pos], dim=1)
    if pool is None:                   # no cache: the window is the canvas, keys = query rows
        lk, key_pos, kv = lq, q_start[:, None] + torch.arange(lq, device=dev), None
    else:
        lk = g.lk
        key_pos = torch.arange(lk, device=dev).expand(len(g.items), lk)
        kv = ShadowKV(build_paged_kv(pool, batch.page_table[inputs.slot], q_start,
                                     col("q_len"), lq, lk, False), lq)
    canvas_ok = key_pos < kv_len[:, None]                             # (B, Lk)
    win = torch.cat([canvas_ok[:, None, :].expand(-1, lq, -1),
                     torch.zeros(len(g.items), lq, n, dtype=torch.bool, device=dev)], dim=2)
    sh_canvas = canvas_ok[:, None, :] & (key_pos[:, None, :] != sh_pos[:, :, None])
    sh_real = (j < blk[:, None])[:, None, :].expand(-1, n, -1)
    shadow = torch.cat([sh_canvas, sh_real], dim=2)                   # (B, n, Lk + n)
    mask = torch.cat([win, shadow], dim=1)
    mask[:, :, 0] = True                                              # no row without a key
    index = torch.cat([inputs.logits_index, lq + j.expand(len(g.items), n)], dim=1)
    return replace(inputs, input_ids=ids, positions=positions, attn_mask=mask[:, None], kv=kv,
                   logits_index=index)


def decide_and_commit(logits: Tensor, g: GroupPlan, inputs: GroupInputs, batch: InputBatch,
                      spec: ModelSpec) -> Tensor:
    """logits (B, 2n, V): the candidates then the shadow -> packed (B, 2 + W): net commits
    (committed - revoked, all inside the block) twice, then the generation positions."""
    n, knobs, flat = g.n_max, inputs.knobs, batch.flat_canvas
    tokens, conf, entropy = propose_batch(logits[:, :n], knobs, g.facts, spec.eos_token_id,
                                          spec.eot_token_id)
    current = flat[inputs.cand_flat]                                  # (B, n) canvas tokens
    is_masked = current == batch.mask_id
    back = F.softmax(logits[:, n:].to(conf.dtype), dim=-1).gather(-1, current[..., None])[..., 0]
    thr = knobs.revoke_threshold
    thr = torch.where(torch.isnan(thr), WINO_REVOKE, thr)
    commit, revoke = wino(conf, knobs, Ranked(conf, entropy, knobs), is_masked, back, thr)
    revoke = revoke & knobs.valid
    new = torch.where(commit, tokens, torch.where(revoke, batch.mask_id, current))
    flat.index_copy_(0, inputs.cand_flat.reshape(-1), new.reshape(-1))
    net = commit.sum(1) - revoke.sum(1)
    return torch.cat((torch.stack((net, net), dim=1), flat[inputs.gen_flat]), dim=1)
