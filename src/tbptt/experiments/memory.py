"""Peak memory held by autograd graphs during a run, counted from the tensors saved for backward."""

from __future__ import annotations

from typing import Any

import torch


class GraphMemory:
    """Peak bytes held by autograd graphs: every tensor saved for backward is counted (each storage
    once) from when it is saved until its graph is freed."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = 0
        self.peak = 0

    def _pack(self, tensor: torch.Tensor) -> Any:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return tensor
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, size]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return _Held(tensor, self, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def hooks(self):
        """The context manager that counts, for ``with``."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)


class _Held:
    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: GraphMemory, key: int) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


def _unpack(held: Any) -> torch.Tensor:
    return held.tensor if isinstance(held, _Held) else held
