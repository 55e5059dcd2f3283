"""The state a MemGPT model carries between calls.

``save``/``load`` write and read ``safetensors`` files with a JSON header (no pickle, so loading
a state file cannot run code); the format and its checks live in :mod:`memgpt.models.state_file`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..memory import MemoryState
from ..memory.state import metadata_dtype
from .block import BlockState, SegmentBuffer
from .config import MemGPTConfig
from .state_file import STATE_FORMAT, STATE_VERSION, config_of, read_state_file, write_state_file

__all__ = ["MemGPTState", "STATE_FORMAT", "STATE_VERSION"]


@runtime_checkable
class _ChecksState(Protocol):
    """What :meth:`MemGPTState.load` calls on a model: ``MemGPTModel.check_state`` (named by its
    shape here: memgpt.models.model imports this module)."""

    def check_state(self, state: MemGPTState, batch_size: int) -> None: ...


@dataclass(frozen=True, eq=False)
class MemGPTState:
    """Per-layer block states, ``position`` (b,) int64: real tokens fed so far per sample, and
    ``previous`` (b,) int64: 1 + the id of the last real token fed (0 = none yet), for token shift.

    The in-segment offset of each row is ``position % segment_len``; a row's unfinished segment
    (its attention keys/values and pending writes) lives in the layers' segment buffers.
    """

    layers: tuple[BlockState, ...]
    position: Tensor
    previous: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not all(isinstance(s, BlockState) for s in self.layers):
            raise TypeError("MemGPTState.layers must be a tuple of BlockState")
        if not isinstance(self.position, Tensor) or self.position.dim() != 1 or self.position.dtype != torch.long:
            got = (
                f"{self.position.dtype} {tuple(self.position.shape)}"
                if isinstance(self.position, Tensor)
                else type(self.position).__name__
            )
            raise ValueError(f"MemGPTState.position must be an int64 tensor (b,), got {got}")
        b = self.position.shape[0]
        if (
            not isinstance(self.previous, Tensor)
            or tuple(self.previous.shape) != (b,)
            or self.previous.dtype != torch.long
        ):
            got = (
                f"{self.previous.dtype} {tuple(self.previous.shape)}"
                if isinstance(self.previous, Tensor)
                else type(self.previous).__name__
            )
            raise ValueError(f"MemGPTState.previous must be an int64 tensor (b,) = ({b},), got {got}")
        for i, layer in enumerate(self.layers):
            if layer.memory.batch_size != b:
                raise ValueError(f"layer {i}: memory batch size {layer.memory.batch_size} != position batch size {b}")
            if layer.buffer is None:
                raise ValueError(f"layer {i}: a model state needs a segment buffer in every layer")
            for f in fields(SegmentBuffer):
                t = getattr(layer.buffer, f.name)
                if not isinstance(t, Tensor) or t.shape[0] != b:
                    raise ValueError(f"layer {i}: buffer {f.name} must be a tensor with batch size {b}")

    @property
    def batch_size(self) -> int:
        """``b``, the rows (streams) of the state."""
        return self.position.shape[0]

    def _map(self, fn) -> MemGPTState:
        return MemGPTState(tuple(layer.map(fn) for layer in self.layers), fn(self.position), fn(self.previous))

    def detach(self) -> MemGPTState:
        """Cut the autograd graph here (truncated BPTT across calls)."""
        return self._map(Tensor.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemGPTState:
        """Move to ``device``; ``dtype`` converts the float storage (keys, values, buffers)."""

        meta = None if dtype is None else metadata_dtype(dtype)

        def move(t: Tensor) -> Tensor:
            # The 4-D float tensors are storage (keys, values, buffered attention keys/values);
            # the 3-D ones are slot metadata (strength, usage), float32 unless float64.
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype if t.dim() == 4 else meta)
            return t.to(device=device)

        return self._map(move)

    def reset_rows(self, mask: Tensor) -> MemGPTState:
        """Forget everything of the rows where ``mask`` (b,) is True (a new document starts)."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size,):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"reset_rows mask must be bool (b,) = ({self.batch_size},), got {got}")
        keep = ~mask.to(self.position.device)

        def reset(t: Tensor) -> Tensor:
            k = keep.view(-1, *([1] * (t.dim() - 1)))
            return torch.where(k, t, torch.zeros((), dtype=t.dtype, device=t.device))

        return self._map(reset)

    def clear_memory(self, mask: Tensor | None = None) -> MemGPTState:
        """Empty the memory stores of the rows in ``mask`` (b,) (default: all rows), keeping the
        unfinished segment, the positions and the previous token: long-term memory is forgotten,
        the current context is not."""
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.position.device)
        layers = tuple(BlockState(layer.memory.reset_rows(mask), layer.buffer) for layer in self.layers)
        return MemGPTState(layers, self.position, self.previous)

    def index_select(self, index: Tensor) -> MemGPTState:
        """Rows reordered/duplicated by ``index`` (b',) (beam search)."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.long, torch.int32):
            got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"index must be an int64/int32 tensor (b',), got {got}")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.batch_size):
            raise ValueError(
                f"index values must lie in [0, {self.batch_size}), got min {int(index.min())} max {int(index.max())}"
            )
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    # ------------------------------------------------------------------ save / load
    def _flat(self) -> dict[str, Tensor]:
        out = {"position": self.position, "previous": self.previous}
        for i, layer in enumerate(self.layers):
            for name, t in layer.memory.to_dict().items():
                out[f"layers.{i}.memory.{name}"] = t
            for f in fields(SegmentBuffer):
                out[f"layers.{i}.buffer.{f.name}"] = getattr(layer.buffer, f.name)
        return out

    @classmethod
    def _from_flat(cls, tensors: dict[str, Tensor], depth: int) -> MemGPTState:
        """Inverse of :meth:`_flat` (the caller has checked the names)."""
        layers = []
        for i in range(depth):
            memory = MemoryState.from_dict(
                {f.name: tensors[f"layers.{i}.memory.{f.name}"] for f in fields(MemoryState)}
            )
            buffer = SegmentBuffer(**{f.name: tensors[f"layers.{i}.buffer.{f.name}"] for f in fields(SegmentBuffer)})
            layers.append(BlockState(memory, buffer))
        return cls(tuple(layers), tensors["position"], tensors["previous"])

    def save(self, path: str | os.PathLike, model: nn.Module | MemGPTConfig) -> None:
        """Write the state to a ``safetensors`` file at ``path`` (atomically; no pickle).

        ``model`` (the MemGPTModel the state belongs to, or its config) supplies what the header
        records and loading checks: depth, widths, segment length, capacity, eviction policy.
        See :mod:`memgpt.models.state_file`.
        """
        config = config_of(model)
        for layer in self.layers:
            layer.memory.check_live()  # a store donated to an in-place write holds a later state now
        write_state_file(path, self._flat(), config, self.batch_size)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: nn.Module | MemGPTConfig | None = None,
        *,
        map_location: str | torch.device | None = None,
    ) -> MemGPTState:
        """Read a state written by :meth:`save`: a new state, or ValueError naming the file, the
        expected and the actual value (corrupt file, foreign file, another model's state).

        With ``model`` the file must match its settings, and the state lands on the model's device
        unless ``map_location`` says otherwise. A missing file raises FileNotFoundError.
        """
        config = None if model is None else config_of(model)
        param = None if model is None or isinstance(model, MemGPTConfig) else next(model.parameters())
        where = repr(os.fspath(path))
        tensors, header = read_state_file(path, config, None if param is None else param.dtype)
        try:
            state = cls._from_flat(tensors, header["config"]["depth"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: inconsistent state file: {e}") from e
        if param is not None and map_location is None:
            map_location = param.device
        if map_location is not None:
            state = state.to(map_location)
        if param is not None and state.position.device == param.device:
            if not isinstance(model, _ChecksState):
                raise TypeError(f"model must be a MemGPTModel or a MemGPTConfig, got {type(model).__name__}")
            try:  # everything it checks is checked above already; kept so the two can never disagree
                model.check_state(state, header["batch_size"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where} does not fit the model: {e}") from e
        return state

    def __repr__(self) -> str:
        mem = self.layers[0].memory if self.layers else None
        return (
            f"MemGPTState(layers={len(self.layers)}, batch_size={self.batch_size}, "
            f"positions={self.position.tolist() if self.batch_size <= 8 else '...'}, memory={mem!r})"
        )
