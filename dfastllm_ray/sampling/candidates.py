"""`Candidates`: what one step proposes for the masked positions of one request's active block."""
from __future__ import annotations

from typing import Callable, Union

from torch import Tensor

LazyTensor = Union[Tensor, Callable[[], Tensor]]


class Candidates:
    """tokens (n,) int64: the token each masked position would take if committed now.
    conf (n,) float64: the policy's confidence; higher commits first.
    entropy (n,) float64: predictive entropy in nats, for the entropy-bound policy. It may be
    given as a zero-argument function: a float64 softmax over the vocabulary costs as much as the
    rest of the step's sampling, so it is computed only when a policy reads it."""

    __slots__ = ("tokens", "conf", "_entropy")

    def __init__(self, tokens: Tensor, conf: Tensor, entropy: LazyTensor):
        self.tokens, self.conf, self._entropy = tokens, conf, entropy

    @property
    def entropy(self) -> Tensor:
        if callable(self._entropy):
            self._entropy = self._entropy()
        return self._entropy

    def __len__(self) -> int:
        return int(self.tokens.shape[0])
