"""`Candidates`: what one step proposes for the masked positions of one request's active block."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Candidates:
    tokens: Tensor    # (n,) int64: the token each masked position would take if committed now
    conf: Tensor      # (n,) float64: the policy's confidence; higher commits first
    entropy: Tensor   # (n,) float64: predictive entropy in nats (entropy-bound policy)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])
