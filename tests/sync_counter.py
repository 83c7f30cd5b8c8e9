"""Counts the operations of a piece of code that make the host wait for the device (tests and benchmarks).

On a GPU, an operation whose result the host must read before it can go on (a tensor's value in a
Python ``if``, ``.item()``, a boolean-mask index, whose output size depends on the data) stalls the
CPU until the GPU has finished every kernel queued before it. The same operations are visible on the
CPU through a dispatch mode, so the count can be taken here: :class:`HostSyncCounter` records every
ATen call that needs a device value on the host.

Not seen by a dispatch mode: ``Tensor.tolist()`` and ``Tensor.cpu()`` of a CPU tensor, and copies between
devices; the code under test is on the CPU, so such calls are listed by reading the code instead.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Output size depends on the data: the host reads the count before it can allocate the result.
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
}


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as counter: ...`` then ``counter.counts`` (op name -> calls) and ``counter.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in _DATA_DEPENDENT:
            name = str(func.overloadpacket.__name__)
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _has_bool_index(args[1]):
            name = f"{func.overloadpacket.__name__}[bool mask]"
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave[no output_size]"
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
