"""The key-value memory store of one memory layer: a plain, typed container of tensors.

Shapes (einops notation, see docs/reference/index.md): ``b`` batch, ``h`` memory heads, ``m`` slots (capacity),
``dk``/``dv`` key and value widths.

The store is a *value*: every operation returns a new ``MemoryState`` and never mutates the one
it was given, so autograd and callers that keep an old state see what they kept. The one
exception is asked for explicitly: ``write(..., inplace=True)`` writes into the given state's
tensors and *donates* that state: any later use of it raises instead of silently reading
contents that have changed (under autograd such writes are logged so that backward can undo
them: :mod:`memgpt.memory.reversible`). It is never a module buffer (DDP would broadcast it from
rank 0 and overwrite each rank's memory).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

import torch
from torch import Tensor

__all__ = ["MemoryState", "metadata_dtype"]


class _WriteLog(Protocol):
    """What a state itself uses of its write log, a :class:`memgpt.memory.reversible.StoreLog`
    (named by its shape here: that module imports this one)."""

    token: Tensor | None


def metadata_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of ``strength``/``usage`` for a store of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _require(cond: bool, message: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(message)


@dataclass(frozen=True, eq=False)
class MemoryState:
    """One layer's memory: ``capacity`` slots per sample and head, plus per-slot metadata.

    Fields
        keys:     (b h m dk)  stored keys ``g * k_new`` (the seed's write)
        values:   (b h m dv)  stored values ``g * v_new``
        valid:    (b h m)     bool, the slot holds a write
        strength: (b h m)     the write gate ``g`` the slot was written with
        step:     (b h m)     int64, the row's write counter when the slot was written (its age)
        usage:    (b h m)     decayed sum of the read weights the slot received
        count:    (b,)        int64, tokens written so far per sample (the ring-buffer pointer)

    ``strength`` and ``usage`` are float32 for bf16/fp16/fp32 stores (eviction never depends on
    bf16 rounding) and float64 for float64 stores (so float64 is exact end to end):
    :func:`metadata_dtype` of the storage dtype.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    strength: Tensor
    step: Tensor
    usage: Tensor
    count: Tensor

    # Set (on the instance) when an in-place write took this state's tensors; not a field.
    _donated = False
    # Set (on the instance) for a store written in place under autograd: its write log and the
    # version of it this state is (see memgpt.memory.reversible); not fields.
    _log: ClassVar[_WriteLog | None] = None
    _version = 0

    def __post_init__(self) -> None:
        self.validate()

    def _donate(self) -> None:
        object.__setattr__(self, "_donated", True)

    def check_live(self) -> None:
        """Raise if this state was donated to an in-place write (its tensors now hold a later state)."""
        if self._donated:
            raise RuntimeError(
                "this MemoryState was donated to write(..., inplace=True) and its tensors now hold "
                "the state that write returned: use that state instead"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(
        cls,
        batch_size: int,
        heads: int,
        capacity: int,
        key_dim: int,
        value_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MemoryState:
        """An empty store: no valid slot, all counters at zero."""
        for name, value in (
            ("batch_size", batch_size),
            ("heads", heads),
            ("capacity", capacity),
            ("key_dim", key_dim),
            ("value_dim", value_dim),
        ):
            _require(
                isinstance(value, int) and not isinstance(value, bool),
                f"{name} must be an int, got {type(value).__name__}",
                TypeError,
            )
            _require(value >= 1, f"{name} must be >= 1, got {value}")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        _require(
            isinstance(dtype, torch.dtype) and dtype.is_floating_point,
            f"dtype must be a floating point dtype, got {dtype!r}",
            TypeError,
        )
        b, h, m = batch_size, heads, capacity
        return cls(
            keys=torch.zeros(b, h, m, key_dim, device=device, dtype=dtype),
            values=torch.zeros(b, h, m, value_dim, device=device, dtype=dtype),
            valid=torch.zeros(b, h, m, device=device, dtype=torch.bool),
            strength=torch.zeros(b, h, m, device=device, dtype=metadata_dtype(dtype)),
            step=torch.zeros(b, h, m, device=device, dtype=torch.long),
            usage=torch.zeros(b, h, m, device=device, dtype=metadata_dtype(dtype)),
            count=torch.zeros(b, device=device, dtype=torch.long),
        )

    # ------------------------------------------------------------------ shape accessors
    @property
    def batch_size(self) -> int:
        """``b``, the rows of the store."""
        return self.keys.shape[0]

    @property
    def heads(self) -> int:
        """``h``, the memory heads."""
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """``m``, the slots per row and head."""
        return self.keys.shape[2]

    @property
    def key_dim(self) -> int:
        """``dk``, the key width."""
        return self.keys.shape[3]

    @property
    def value_dim(self) -> int:
        """``dv``, the value width."""
        return self.values.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of keys and values."""
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        """The device of every field."""
        return self.keys.device

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check ranks, shapes, dtypes and devices of all fields; raise ValueError/TypeError.

        Runs on every construction (decoding builds a few states per token), so the checks are
        plain comparisons and a message is only formatted when a check fails.
        """
        names = [f.name for f in fields(self)]
        tensors = [getattr(self, name) for name in names]
        for name, t in zip(names, tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"MemoryState.{name} must be a Tensor, got {type(t).__name__}")
        keys, values = self.keys, self.values
        if keys.dim() != 4:
            raise ValueError(f"keys must be (b h m dk), got shape {tuple(keys.shape)}")
        b, h, m, _ = keys.shape
        if m < 1:
            raise ValueError(f"capacity must be >= 1, got {m}")
        if values.dim() != 4 or values.shape[:3] != keys.shape[:3]:
            raise ValueError(f"values must be (b h m dv) = ({b}, {h}, {m}, dv), got shape {tuple(values.shape)}")
        if not keys.dtype.is_floating_point or values.dtype != keys.dtype:
            raise TypeError(f"keys and values must share a floating dtype, got {keys.dtype} and {values.dtype}")
        meta = metadata_dtype(keys.dtype)
        slot_shape = keys.shape[:3]
        for name, dt in (("valid", torch.bool), ("strength", meta), ("step", torch.long), ("usage", meta)):
            t = getattr(self, name)
            if t.shape != slot_shape:
                raise ValueError(f"{name} must be (b h m) = ({b}, {h}, {m}), got shape {tuple(t.shape)}")
            if t.dtype != dt:
                raise TypeError(f"{name} must have dtype {dt}, got {t.dtype}")
        if self.count.shape != keys.shape[:1]:
            raise ValueError(f"count must be (b,) = ({b},), got shape {tuple(self.count.shape)}")
        if self.count.dtype != torch.long:
            raise TypeError(f"count must be int64, got {self.count.dtype}")
        device = keys.device
        for name, t in zip(names, tensors):
            if t.device != device:
                raise ValueError(f"all fields must be on one device: keys on {device}, {name} on {t.device}")

    def check_compatible(
        self,
        *,
        batch_size: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        capacity: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        what: str = "memory state",
    ) -> None:
        """Raise a clear error if this store was made for another layer or batch (or was donated)."""
        self.check_live()
        checks = [
            ("batch size", batch_size, self.batch_size),
            ("heads", heads, self.heads),
            ("key_dim", key_dim, self.key_dim),
            ("value_dim", value_dim, self.value_dim),
        ]
        if capacity is not None:
            checks.append(("capacity", capacity, self.capacity))
        for name, expected, actual in checks:
            _require(expected == actual, f"{what}: expected {name} {expected}, got {actual}")
        if dtype is not None:
            _require(dtype == self.dtype, f"{what}: expected dtype {dtype}, got {self.dtype}", TypeError)
        if device is not None:
            _require(
                torch.device(device).type == self.device.type
                and (torch.device(device).index in (None, self.device.index) or self.device.index is None),
                f"{what}: expected device {device}, got {self.device}",
            )

    # ------------------------------------------------------------------ value operations
    def replace(self, **changes: Tensor) -> MemoryState:
        """A new state with some fields replaced (validated)."""
        self.check_live()
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(kwargs)
        _require(not unknown, f"unknown MemoryState fields {sorted(unknown)}")
        if changes.keys() & {"keys", "values", "strength", "valid"}:  # what a logged read depends on
            self._check_copy_keeps_grad()
        kwargs.update(changes)
        return MemoryState(**kwargs)

    def _check_copy_keeps_grad(self) -> None:
        if self._log is not None and self._log.token is not None and torch.is_grad_enabled():
            raise RuntimeError(
                "this memory state is written in place under autograd (its gradients flow only through "
                "memgpt.memory.read and write); copying its tensors here would silently cut them. "
                "Call detach() first, or do this under torch.no_grad()"
            )

    def _map(self, fn) -> MemoryState:
        self.check_live()
        if fn is not Tensor.detach:
            self._check_copy_keeps_grad()
        return MemoryState(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def detach(self) -> MemoryState:
        """Cut the autograd graph here (truncated BPTT)."""
        return self._map(Tensor.detach)

    def clone(self) -> MemoryState:
        """A copy of every field (raises for a logged store under autograd: ``detach()`` it first)."""
        return self._map(Tensor.clone)

    def is_contiguous(self) -> bool:
        """Whether every field is contiguous."""
        return all(getattr(self, f.name).is_contiguous() for f in fields(self))

    def contiguous(self) -> MemoryState:
        """The same contents with every field contiguous (a copy of the fields that are not)."""
        return self._map(Tensor.contiguous)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MemoryState:
        """Move to ``device``; ``dtype`` converts keys and values, and metadata to ``metadata_dtype(dtype)``."""
        self.check_live()
        self._check_copy_keeps_grad()
        if dtype is not None:
            _require(
                isinstance(dtype, torch.dtype) and dtype.is_floating_point,
                f"dtype must be floating point, got {dtype!r}",
                TypeError,
            )

        meta = None if dtype is None else metadata_dtype(dtype)

        def move(t: Tensor) -> Tensor:
            if t is self.strength or t is self.usage:
                return t.to(device=device, dtype=meta)
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return MemoryState(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def reset_rows(self, mask: Tensor) -> MemoryState:
        """Empty the rows where ``mask`` (b,) is True (a document boundary); others untouched."""
        _require(isinstance(mask, Tensor), f"mask must be a Tensor, got {type(mask).__name__}", TypeError)
        _require(
            tuple(mask.shape) == (self.batch_size,),
            f"reset_rows mask must be (b,) = ({self.batch_size},), got shape {tuple(mask.shape)}",
        )
        _require(mask.dtype == torch.bool, f"reset_rows mask must be bool, got {mask.dtype}", TypeError)
        keep = ~mask.to(self.device)

        def reset(t: Tensor) -> Tensor:
            k = keep.view(-1, *([1] * (t.dim() - 1)))
            return torch.where(k, t, torch.zeros((), dtype=t.dtype, device=t.device))

        return self._map(reset)

    def index_select(self, index: Tensor) -> MemoryState:
        """Rows reordered/duplicated by ``index`` (b',) of int64 (beam search); b' may differ from b."""
        _require(isinstance(index, Tensor), f"index must be a Tensor, got {type(index).__name__}", TypeError)
        _require(index.dim() == 1, f"index must be 1-D (b',), got shape {tuple(index.shape)}")
        _require(
            index.dtype in (torch.long, torch.int32),
            f"index must be int64 or int32, got {index.dtype}",
            TypeError,
        )
        self.check_live()
        index = index.to(self.device)
        if index.numel() and not torch.compiler.is_compiling():
            lo, hi = int(index.min()), int(index.max())
            _require(
                lo >= 0 and hi < self.batch_size,
                f"index values must lie in [0, {self.batch_size}), got min {lo} max {hi}",
            )
        return self._map(lambda t: t.index_select(0, index))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Tensor]:
        """The fields by name (the tensors themselves, not copies), e.g. to save them; see :meth:`from_dict`."""
        self.check_live()
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> MemoryState:
        """Rebuild from :meth:`to_dict`; missing or extra entries raise ValueError."""
        names = {f.name for f in fields(cls)}
        _require(isinstance(tensors, dict), f"expected a dict of tensors, got {type(tensors).__name__}", TypeError)
        missing, extra = names - set(tensors), set(tensors) - names
        _require(
            not missing and not extra, f"MemoryState fields: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
        return cls(**tensors)

    def __repr__(self) -> str:
        return (
            f"MemoryState(batch_size={self.batch_size}, heads={self.heads}, capacity={self.capacity}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, dtype={self.dtype}, device={self.device}, "
            f"requires_grad={self.keys.requires_grad or self.values.requires_grad})"
        )
