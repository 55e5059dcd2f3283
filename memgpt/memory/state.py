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

``save``/``load`` write and read a ``safetensors`` file with a checked JSON header (format
``memgpt.MemoryState``; the file itself is :mod:`memgpt.memory.tensor_file`'s). The store
helpers below (``store_record``, ``store_spec``, ``check_store_values``, ...) are shared with
the file of ``memgpt.integrations.MemoryStates``, which holds several stores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .tensor_file import (
    FLOAT_DTYPES,
    TensorSpec,
    check_values,
    header_field,
    read_tensor_header,
    read_tensors,
    write_tensor_file,
)

__all__ = ["MemoryState", "metadata_dtype", "MEMORY_STATE_FORMAT", "MEMORY_STATE_VERSION"]

MEMORY_STATE_FORMAT = "memgpt.MemoryState"
"""The ``format`` field of the header of a file written by :meth:`MemoryState.save`."""
MEMORY_STATE_VERSION = 1
"""The ``format_version`` of such a file that this library writes and reads."""

STORE_SHAPE_KEYS = ("heads", "capacity", "key_dim", "value_dim")
# The settings of a memory layer that decide what its store's slot metadata mean (the eviction
# policy that maintains them, the usage decay, shifted keys); recorded when a layer is given.
LAYER_SETTING_KEYS = ("eviction", "usage_decay", "shift_keys")


class _WriteLog(Protocol):
    """What a state itself uses of its write log, a :class:`memgpt.memory.reversible.StoreLog`
    (named by its shape here: that module imports this one)."""

    token: Tensor | None


@runtime_checkable
class _MakesStores(Protocol):
    """What a store's file needs of a layer: ``MemoryLayer.empty_state`` (``ResidualMemory`` and
    ``WithMemory`` have it too). Named by its shape: memgpt.memory cannot import memgpt.layers."""

    def empty_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState: ...


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

    def save(self, path: str | os.PathLike, layer: nn.Module | None = None) -> None:
        """Write the store to a ``safetensors`` file at ``path``: atomically, no pickle, a detached
        CPU copy of keys (b h m dk), values (b h m dv), valid/strength/step/usage (b h m), count (b,).

        The header records the format and its version, the library version, the batch size,
        heads, capacity, key/value widths and dtype, and a SHA-256 over header and tensors. With
        ``layer`` (the ``MemoryLayer`` the store belongs to, or a ``ResidualMemory``/``WithMemory``
        around one) the store must fit it, and the header also records the layer's eviction policy,
        usage decay and ``shift_keys``, which :meth:`load` compares with the layer it is given.

        A donated store refuses (RuntimeError: save the state the write returned); a store that no
        load would accept (a negative counter, a NaN or negative usage, ...) raises ValueError; a
        file that cannot be written raises OSError naming ``path``. ``torch.save`` is not the way:
        ``torch.load``'s default ``weights_only=True`` refuses the pickled class.
        """
        self.check_live()
        path = os.fspath(path)
        where = f"store to save in {path!r}"
        record = store_record(self)
        if layer is not None:
            want = layer_record(layer)
            record["layer"] = check_store_fits(where, record, want, "does not fit the layer", "the store")
        tensors = self.to_dict()
        check_store_values(where, tensors)
        header = {"batch_size": self.batch_size} | record
        write_tensor_file(path, tensors, header, format=MEMORY_STATE_FORMAT, version=MEMORY_STATE_VERSION)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        layer: nn.Module | None = None,
        *,
        map_location: torch.device | str | None = None,
    ) -> MemoryState:
        """Read a store written by :meth:`save`: a new, checked state, or ValueError naming the file,
        the expected and the actual value (a corrupt, truncated, foreign or newer file, another
        layer's store). A missing file raises FileNotFoundError.

        Checks, in order: the file parses; its header is a ``memgpt.MemoryState`` header of a
        version this library reads, and complete; the tensors are exactly those the header implies
        (names, dtypes, shapes); the SHA-256 matches; ``valid`` is 0/1, ``count`` and ``step`` are
        >= 0, ``strength`` is finite and ``usage`` finite and >= 0; with ``layer``, the heads,
        capacity and widths are the layer's, and so are the eviction settings when the file has them.

        The store lands on ``map_location``, else on the device of ``layer``'s parameters, else the CPU.
        """
        want = None if layer is None else layer_record(layer)  # a wrong argument fails before any reading
        where = repr(os.fspath(path))
        header = read_tensor_header(path, format=MEMORY_STATE_FORMAT, version=MEMORY_STATE_VERSION)
        batch = header_batch_size(where, header)
        check_store_record(where, header)
        tensors = read_tensors(path, header, store_spec(header, batch))
        check_store_values(where, tensors)
        # Integrity first, then compatibility: a corrupt file is reported as corrupt, not as "another layer".
        if want is not None:
            check_store_fits(where, header, want, "was saved for another layer", "the file")
        try:
            state = cls.from_dict(tensors)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: inconsistent state file: {e}") from e
        if map_location is None and layer is not None:
            map_location = layer_device(layer)
        return state if map_location is None else state.to(map_location)

    def __repr__(self) -> str:
        return (
            f"MemoryState(batch_size={self.batch_size}, heads={self.heads}, capacity={self.capacity}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, dtype={self.dtype}, device={self.device}, "
            f"requires_grad={self.keys.requires_grad or self.values.requires_grad})"
        )


# ---------------------------------------------------------------------- a store in a file
# One store's part of a file header, its *record*: heads, capacity, key_dim, value_dim, dtype (the
# storage dtype's name) and layer (None, or the eviction settings of the layer it was saved with).
# A MemoryState file's header is ``batch_size`` plus one record; a MemoryStates file's holds a
# list of them. The same helpers check both.


def store_record(state: MemoryState) -> dict[str, Any]:
    """The header record of ``state``: its shapes and dtype, ``layer`` None."""
    shapes = dict(zip(STORE_SHAPE_KEYS, (state.heads, state.capacity, state.key_dim, state.value_dim)))
    return shapes | {"dtype": str(state.dtype).removeprefix("torch."), "layer": None}


def header_batch_size(where: str, header: Mapping[str, Any]) -> int:
    """The header's ``batch_size``: an int >= 1, else ValueError."""
    batch = header_field(where, header, "batch_size", int)
    if batch < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {batch}")
    return batch


def check_store_record(where: str, record: Mapping[str, Any]) -> None:
    """ValueError unless ``record`` is a complete record: positive int shapes, a storage dtype this
    library saves, and ``layer`` None or the eviction settings (eviction, usage_decay, shift_keys)."""
    for key in STORE_SHAPE_KEYS:
        value = header_field(where, record, key, int)
        if value < 1:
            raise ValueError(f"{where}: {key} must be >= 1, got {value}")
    if header_field(where, record, "dtype", str) not in FLOAT_DTYPES:
        raise ValueError(f"{where}: dtype expected one of {sorted(FLOAT_DTYPES)}, got {record['dtype']!r}")
    if "layer" not in record:
        raise ValueError(f"{where}: header field 'layer' expected None or the layer's eviction settings, got none")
    settings = record["layer"]
    if settings is None:
        return
    if not isinstance(settings, dict) or sorted(settings) != sorted(LAYER_SETTING_KEYS):
        got = sorted(settings) if isinstance(settings, dict) else settings
        raise ValueError(
            f"{where}: header field 'layer' expected None or keys {sorted(LAYER_SETTING_KEYS)}, got {got!r}"
        )
    header_field(where, settings, "eviction", str)
    decay = header_field(where, settings, "usage_decay", (int, float))
    if isinstance(decay, bool) or not 0 <= decay <= 1:
        raise ValueError(f"{where}: usage_decay expected a float in [0, 1], got {decay!r}")
    header_field(where, settings, "shift_keys", bool)


def store_spec(record: Mapping[str, Any], batch_size: int, prefix: str = "") -> TensorSpec:
    """name -> (shape, dtype) of the tensors of a store of ``batch_size`` rows and ``record``
    (checked by :func:`check_store_record`), each name ``prefix`` + a field name."""
    b, (h, m, dk, dv) = batch_size, (record[k] for k in STORE_SHAPE_KEYS)
    dtype = FLOAT_DTYPES[record["dtype"]]
    meta, long = metadata_dtype(dtype), torch.long
    shapes = {
        "keys": ((b, h, m, dk), dtype),
        "values": ((b, h, m, dv), dtype),
        "valid": ((b, h, m), torch.bool),
        "strength": ((b, h, m), meta),
        "step": ((b, h, m), long),
        "usage": ((b, h, m), meta),
        "count": ((b,), long),
    }
    return {prefix + name: shape for name, shape in shapes.items()}


def check_store_values(where: str, tensors: Mapping[str, Tensor], prefix: str = "") -> None:
    """The ranges a store's fields must be in (``tensors``: name -> tensor, as :func:`store_spec`
    names them): ``valid`` 0 or 1 (its bytes), ``count`` and ``step`` >= 0, ``strength`` finite,
    ``usage`` finite and >= 0. Else ValueError naming the tensor and the first bad value."""
    check_values(where, prefix + "valid", tensors[prefix + "valid"].view(torch.uint8), 0, 1)
    check_values(where, prefix + "count", tensors[prefix + "count"], 0)
    check_values(where, prefix + "step", tensors[prefix + "step"], 0)
    check_values(where, prefix + "strength", tensors[prefix + "strength"], finite=True)
    check_values(where, prefix + "usage", tensors[prefix + "usage"], 0, finite=True)


def layer_settings(layer: object) -> dict[str, Any] | None:
    """The eviction settings (eviction, usage_decay, shift_keys) of ``layer``, a ``MemoryLayer``,
    or of the one it wraps (``ResidualMemory.layer``, ``WithMemory.memory``); None if it has none."""
    obj: object = layer
    for _ in range(3):
        if all(hasattr(obj, k) for k in LAYER_SETTING_KEYS):
            eviction, decay, shift = (getattr(obj, k) for k in LAYER_SETTING_KEYS)
            return {"eviction": str(eviction), "usage_decay": float(decay), "shift_keys": bool(shift)}
        inner = getattr(obj, "layer", None)
        obj = inner if inner is not None else getattr(obj, "memory", None)
        if obj is None:
            break
    return None


def layer_record(layer: object, what: str = "layer") -> dict[str, Any]:
    """The record a store made by ``layer`` has (no dtype: a layer takes a store of any float
    dtype): its shapes, from its ``empty_state`` on the meta device, and :func:`layer_settings`."""
    if not isinstance(layer, _MakesStores):
        raise TypeError(f"{what} must be a MemoryLayer (or a module with its empty_state), got {type(layer).__name__}")
    empty = layer.empty_state(1, device="meta")
    if not isinstance(empty, MemoryState):
        raise TypeError(f"{what}.empty_state must return a MemoryState, got {type(empty).__name__}")
    return store_record(empty) | {"dtype": None, "layer": layer_settings(layer)}


def check_store_fits(
    where: str, record: Mapping[str, Any], want: Mapping[str, Any], problem: str, ours: str, what: str = "layer"
) -> dict[str, Any] | None:
    """ValueError ``"{where} {problem}: {key} expected {the layer's} (the layer), got {ours'} ({ours})"``
    unless ``record`` has the shapes of ``want`` (a :func:`layer_record`) and, when both have them,
    its eviction settings. Returns ``want``'s eviction settings."""
    checks = [(k, want[k], record[k]) for k in STORE_SHAPE_KEYS]
    if want["layer"] is not None and record.get("layer") is not None:
        checks += [(k, want["layer"][k], record["layer"][k]) for k in LAYER_SETTING_KEYS]
    for key, expected, actual in checks:
        if expected != actual:
            raise ValueError(f"{where} {problem}: {key} expected {expected!r} (the {what}), got {actual!r} ({ours})")
    return want["layer"]


def layer_device(layer: object) -> torch.device | None:
    """The device of ``layer``'s first parameter (None: a module without parameters, or not a module)."""
    if not isinstance(layer, nn.Module):
        return None
    p = next(layer.parameters(), None)
    return None if p is None else p.device
