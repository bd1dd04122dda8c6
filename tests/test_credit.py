"""dInfer's credit fusion with a bounded (token, credit) state == the official dense matrix."""
from __future__ import annotations

import torch

from dfastllm_ray.sampling.credit import CreditState, credit_fuse, credit_update, dense_credit


def steps(seed: int, b=3, n=5, v=20, t=6):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, n, v, generator=g) * 2
    for _ in range(t):
        masked = torch.rand(b, n, generator=g) < 0.8
        yield base + torch.randn(b, n, v, generator=g), masked


def test_bounded_state_equals_dense_matrix_when_k_covers_the_steps():
    for seed in range(5):
        state, mat = CreditState.empty(3, 5, k=6), torch.zeros(3, 5, 20)
        for logits, masked in steps(seed):
            state = credit_update(logits, masked, state)
            fused = credit_fuse(logits, state)
            want, mat = dense_credit(logits, masked, mat)
            torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)


def test_small_k_only_drops_the_least_credited_boosts():
    for seed in range(5):
        state = CreditState.empty(3, 5, k=1)
        for logits, masked in steps(seed):
            state = credit_update(logits, masked, state)
            fused = credit_fuse(logits, state)
            assert (fused >= logits - 1e-6).all() and state.ids.shape == (3, 5, 1)


def test_batch_equals_rows():
    full = CreditState.empty(3, 5)
    rows = [CreditState.empty(1, 5) for _ in range(3)]
    for logits, masked in steps(11):
        full = credit_update(logits, masked, full)
        for r in range(3):
            rows[r] = credit_update(logits[r:r + 1], masked[r:r + 1], rows[r])
            assert torch.equal(rows[r].ids[0], full.ids[r])
            assert torch.equal(rows[r].credit[0], full.credit[r])
