"""Peak bytes of live tensor storages allocated by torch ops inside a block — a device-agnostic meter that works on CPU.

`torch.cuda.max_memory_allocated` has no CPU counterpart, and tracemalloc does not see torch's allocator. This
`TorchDispatchMode` sees every op (including those run by autograd in the backward) after it ran: each output
whose storage is not one of the op's inputs' storages (i.e. not a view or an in-place / `out=` result) is a new
allocation of `storage.nbytes()` bytes, which stays live until a weakref finaliser on the storage reports it freed.
`peak` is the largest sum of live bytes seen, counting only storages allocated inside the block (tensors that
existed before are the caller's baseline). Allocator workspaces internal to one kernel are not seen; measure the
process RSS for those (see tools/bench_topk.py).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["TensorMemoryMeter"]


class TensorMemoryMeter(TorchDispatchMode):
    """`with TensorMemoryMeter() as meter: ...` then `meter.peak` (bytes) and `meter.live` (bytes still held)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()  # data_ptr of storages allocated inside the block and not yet freed

    def _free(self, ptr: int, nbytes: int) -> None:
        if ptr in self._tracked:
            self._tracked.discard(ptr)
            self.live -= nbytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, nbytes)
        return out
