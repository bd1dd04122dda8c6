"""Count the aten ops a piece of the step dispatches, and the ones that would sync a GPU.

On a GPU every op is a kernel launch and some ops wait for the device: `.item()` and
`.tolist()` (`_local_scalar_dense`), `nonzero`, boolean-mask indexing (`index` / `index_put_`
with a bool index, `masked_select`), whose output size depends on data. Counting them on CPU
(a `TorchDispatchMode`) shows what a step will cost on a GPU before one is at hand.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "item")


def _has_bool_index(args) -> bool:
    for a in args:
        items = a if isinstance(a, (list, tuple)) else [a]
        for t in items:
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.dim() > 0:
                return True
    return False


class OpCounter(TorchDispatchMode):
    """ops: aten op name -> calls; views: calls of view ops (select, unsqueeze, expand, ...:
    metadata only, no kernel on a GPU); syncs: the data-dependent ones (names, or
    'bool_index:<op>')."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.views += bool(func.is_view)
        if name in SYNC_OPS:
            self.syncs[name] += 1
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args[1:2]):
            self.syncs[f"bool_index:{name}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that would launch work on a GPU: every op but the views."""
        return self.total - self.views


@contextmanager
def count_ops() -> Iterator[OpCounter]:
    counter = OpCounter()
    with counter:
        yield counter
