"""The memory state of a model with several inserted memory layers: one MemoryState per layer.

``MemoryStates.save``/``load`` write and read a ``safetensors`` file with a checked JSON header
(format ``memgpt.MemoryStates``): the batch size, the indices of the wrapped model's layers the
memories sit after (when saved with the model), and per store the record a ``MemoryState`` file
has (heads, capacity, key/value widths, dtype, the layer's eviction settings); the tensors are
``memories.<i>.<field>``. The file and the checks are those of :meth:`MemoryState.save`
(:mod:`memgpt.memory.tensor_file` underneath).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..memory import MemoryState
from ..memory.state import (
    STORE_SHAPE_KEYS,
    check_store_fits,
    check_store_record,
    check_store_values,
    header_batch_size,
    layer_device,
    layer_record,
    store_record,
    store_spec,
)
from ..memory.tensor_file import TensorSpec, read_tensor_header, read_tensors, write_tensor_file

__all__ = ["MemoryStates", "MEMORY_STATES_FORMAT", "MEMORY_STATES_VERSION"]

MEMORY_STATES_FORMAT = "memgpt.MemoryStates"
"""The ``format`` field of the header of a file written by :meth:`MemoryStates.save`."""
MEMORY_STATES_VERSION = 1
"""The ``format_version`` of such a file that this library writes and reads."""

_RECORD_KEYS = sorted((*STORE_SHAPE_KEYS, "dtype", "layer"))


def _memory_layers(model: object) -> list[tuple[int, nn.Module]]:
    """(index of the wrapped layer it sits after, memory layer) for each of ``model``'s memory
    layers, in order: what a ``MemoryModel`` has in ``after`` and ``memories`` (named by its shape
    here: memgpt.integrations.hf imports this module)."""
    after, memories = getattr(model, "after", None), getattr(model, "memories", None)
    if not (
        isinstance(after, tuple)
        and all(isinstance(i, int) for i in after)
        and isinstance(memories, nn.ModuleDict)
        and all(str(i) in memories for i in after)
    ):
        raise TypeError(f"model must be a MemoryModel, got {type(model).__name__}")
    return [(i, memories[str(i)]) for i in after]


def _wants(layers: list[tuple[int, nn.Module]]) -> list[dict[str, Any]]:
    return [layer_record(layer, f"model.memories[{str(index)!r}]") for index, layer in layers]


def _check_header(where: str, header: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The store records and ``after`` of a MemoryStates header, checked complete; else ValueError."""
    records = header.get("memories")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{where}: header field 'memories' must be a non-empty list of stores, got {records!r}")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or sorted(record) != _RECORD_KEYS:
            got = sorted(record) if isinstance(record, dict) else record
            raise ValueError(f"{where}: memories[{i}] expected a store record with keys {_RECORD_KEYS}, got {got!r}")
        check_store_record(f"{where}: memories[{i}]", record)
    after = header.get("after", "missing")
    if after is not None and not (
        isinstance(after, list)
        and len(after) == len(records)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in after)
        and after == sorted(set(after))
    ):
        raise ValueError(
            f"{where}: header field 'after' expected None or {len(records)} increasing layer indices, got {after!r}"
        )
    return records, after


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

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, model: nn.Module | None = None) -> None:
        """Write every store to one ``safetensors`` file at ``path`` (atomically; no pickle; detached
        CPU copies), as :meth:`MemoryState.save` writes one: store ``i``'s fields are the tensors
        ``memories.<i>.keys`` (b h m dk), ``.values`` (b h m dv), ``.valid``/``.strength``/``.step``/
        ``.usage`` (b h m) and ``.count`` (b,).

        With ``model`` (the ``MemoryModel`` the stores belong to) there must be one store per
        memory layer, each fitting its layer, and the header also records ``model.after`` and each
        layer's eviction settings, which :meth:`load` compares. A donated store refuses
        (RuntimeError); an empty ``MemoryStates`` or a store no load would accept raises
        ValueError; a file that cannot be written raises OSError naming ``path``.
        """
        if not self.memories:
            raise ValueError("MemoryStates holds no memory: there is nothing to save")
        for memory in self.memories:
            memory.check_live()
        path = os.fspath(path)
        where = f"states to save in {path!r}"
        layers = None if model is None else _memory_layers(model)
        wants = None if layers is None else _wants(layers)
        if layers is not None and len(layers) != len(self):
            raise ValueError(
                f"{where} do not fit the model: {len(layers)} memory layers expected (the model), "
                f"got {len(self)} stores"
            )
        records: list[dict[str, Any]] = []
        tensors: dict[str, Tensor] = {}
        for i, memory in enumerate(self.memories):
            record = store_record(memory)
            if layers is not None and wants is not None:
                record["layer"] = check_store_fits(
                    f"{where}: memories[{i}] (after layer {layers[i][0]})",
                    record,
                    wants[i],
                    "does not fit its layer",
                    "the store",
                )
            records.append(record)
            fields = {f"memories.{i}.{name}": t for name, t in memory.to_dict().items()}
            check_store_values(where, fields, f"memories.{i}.")
            tensors |= fields
        after = None if layers is None else [index for index, _ in layers]
        header = {"batch_size": self.batch_size, "after": after, "memories": records}
        write_tensor_file(path, tensors, header, format=MEMORY_STATES_FORMAT, version=MEMORY_STATES_VERSION)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: nn.Module | None = None,
        *,
        map_location: torch.device | str | None = None,
    ) -> MemoryStates:
        """Read stores written by :meth:`save`: new, checked ``MemoryStates``, or ValueError naming
        the file, the expected and the actual value (a corrupt, truncated, foreign or newer file,
        another model's stores). A missing file raises FileNotFoundError.

        Checks, in order: the file parses; its header is a ``memgpt.MemoryStates`` header of a
        version this library reads, and complete; the tensors are exactly those the header implies
        (names, dtypes, shapes); the SHA-256 matches; every store's values are in range (as
        :meth:`MemoryState.load` checks them); with ``model``, the number of memory layers, the
        layers they sit after (when the file has them), each store's heads, capacity and widths and
        (when the file has them) eviction settings are the model's.

        Each store lands on ``map_location``, else on its memory layer's device (a device map may
        spread them), else the CPU.
        """
        layers = None if model is None else _memory_layers(model)
        wants = None if layers is None else _wants(layers)  # a wrong argument fails before any reading
        where = repr(os.fspath(path))
        header = read_tensor_header(path, format=MEMORY_STATES_FORMAT, version=MEMORY_STATES_VERSION)
        batch = header_batch_size(where, header)
        records, saved_after = _check_header(where, header)
        spec: TensorSpec = {}
        for i, record in enumerate(records):
            spec |= store_spec(record, batch, f"memories.{i}.")
        tensors = read_tensors(path, header, spec)
        for i in range(len(records)):
            check_store_values(where, tensors, f"memories.{i}.")
        # Integrity first, then compatibility: a corrupt file is reported as corrupt, not as "another model".
        if layers is not None and wants is not None:
            if len(layers) != len(records):
                raise ValueError(
                    f"{where} was saved for another model: {len(layers)} memory layers expected (the model), "
                    f"got {len(records)} (the file)"
                )
            after = [index for index, _ in layers]
            if saved_after is not None and after != saved_after:
                raise ValueError(
                    f"{where} was saved for another model: memories after layers expected {after} "
                    f"(the model), got {saved_after} (the file)"
                )
            for i, (record, want) in enumerate(zip(records, wants)):
                where_i = f"{where}: memories[{i}] (after layer {after[i]})"
                check_store_fits(where_i, record, want, "was saved for another layer", "the file")
        memories = []
        for i, record in enumerate(records):
            fields = {name: tensors[f"memories.{i}.{name}"] for name in store_spec(record, batch)}
            try:
                memory = MemoryState.from_dict(fields)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: inconsistent state file: memories[{i}]: {e}") from e
            device = map_location if map_location is not None or layers is None else layer_device(layers[i][1])
            memories.append(memory if device is None else memory.to(device))
        return cls(tuple(memories))

    def __repr__(self) -> str:
        if not self.memories:
            return "MemoryStates(layers=0)"
        m = self.memories[0]
        return (
            f"MemoryStates(layers={len(self)}, batch_size={m.batch_size}, heads={m.heads}, "
            f"capacity={m.capacity}, dtype={m.dtype}, device={m.device})"
        )
