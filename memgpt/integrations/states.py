"""The memory state of a model with several inserted memory layers: one MemoryState per layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..memory import MemoryState

__all__ = ["MemoryStates"]


@dataclass(frozen=True, eq=False)
class MemoryStates:
    """``memories``: one :class:`MemoryState` per inserted memory layer, in model order.

    A plain value like ``MemoryState``: every method returns a new ``MemoryStates``.
    All stores share the batch dimension ``b``.
    """

    memories: tuple[MemoryState, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.memories, tuple) or not all(isinstance(m, MemoryState) for m in self.memories):
            got = type(self.memories).__name__
            if isinstance(self.memories, tuple):
                got = "tuple of " + ", ".join(sorted({type(m).__name__ for m in self.memories}))
            raise TypeError(f"MemoryStates.memories must be a tuple of MemoryState, got {got}")
        sizes = [m.batch_size for m in self.memories]
        if len(set(sizes)) > 1:
            raise ValueError(f"all memories must share one batch size, got {sizes}")

    @property
    def batch_size(self) -> int:
        """``b``, shared by every store (ValueError when there is none)."""
        if not self.memories:
            raise ValueError("MemoryStates holds no memory, so it has no batch size")
        return self.memories[0].batch_size

    def __len__(self) -> int:
        return len(self.memories)

    def __iter__(self) -> Iterator[MemoryState]:
        return iter(self.memories)

    def __getitem__(self, i: int) -> MemoryState:
        return self.memories[i]

    def _map(self, fn: Callable[[MemoryState], MemoryState]) -> MemoryStates:
        return MemoryStates(tuple(fn(m) for m in self.memories))

    def detach(self) -> MemoryStates:
        """Cut the autograd graph here (truncated BPTT across calls)."""
        return self._map(MemoryState.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemoryStates:
        """Every store moved to ``device`` (and ``dtype``, see :meth:`MemoryState.to`)."""
        return self._map(lambda m: m.to(device, dtype))

    def reset_rows(self, mask: Tensor) -> MemoryStates:
        """Empty every store in the rows where ``mask`` (b,) bool is True (a new document)."""
        return self._map(lambda m: m.reset_rows(mask))

    def index_select(self, index: Tensor) -> MemoryStates:
        """Rows reordered/duplicated by ``index`` (b',) int64 (beam search)."""
        return self._map(lambda m: m.index_select(index))

    def __repr__(self) -> str:
        if not self.memories:
            return "MemoryStates(layers=0)"
        m = self.memories[0]
        return (
            f"MemoryStates(layers={len(self)}, batch_size={m.batch_size}, heads={m.heads}, "
            f"capacity={m.capacity}, dtype={m.dtype}, device={m.device})"
        )
