"""The trainer's block-structured masks: rows masked as the block schedule leaves a canvas."""
from __future__ import annotations

import torch

from dfastllm_ray.train.trainer import block_masks


def _rows(share: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gen = torch.zeros(64, 30, dtype=torch.bool)
    gen[:, 5:] = True                                   # 25 generation positions: blocks of 8
    iid = (torch.rand(64, 30, generator=g) < 0.5) & gen
    iid[:, 5::8] = True                 # every block holds a mask, so its first one marks it
    return iid, gen, block_masks(iid, gen, 8, share, g)


def test_structured_rows_are_a_clean_prefix_one_noisy_block_and_a_masked_tail():
    iid, gen, m = _rows(1.0)
    for r in range(64):
        gpos = m[r, 5:].tolist()
        k = next(i // 8 for i in range(25) if gpos[i])              # first block with a mask
        assert not any(gpos[: 8 * k])                                # earlier blocks clean
        assert all(gpos[8 * (k + 1):])                               # later blocks all masked
        assert gpos[8 * k: 8 * (k + 1)] == iid[r, 5 + 8 * k: 5 + 8 * (k + 1)].tolist()
    assert not m[:, :5].any()                                        # the prompt never


def test_share_zero_keeps_the_iid_masks_and_share_mixes_rows():
    iid, _, m = _rows(0.0)
    assert torch.equal(m, iid)
    iid, _, m = _rows(0.5)
    same = (m == iid).all(1)
    assert 0 < same.sum() < 64                                       # some rows of each kind
