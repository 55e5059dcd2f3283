"""Memory that survives a restart: the format of a :class:`MemGPTState`'s ``safetensors`` file.

This module knows the file (its header, tensor layout and checks), not the state or the model:
it reads and writes a flat ``name -> tensor`` dict, and :mod:`memgpt.models.state` builds the
state from it. So persistence needs neither :mod:`memgpt.models.model` nor the state class.

No pickle: the file is a JSON header plus raw tensor bytes, so loading one cannot run code.
The safetensors metadata holds one entry, ``memgpt.state``: a JSON header with the format
name and version, the library version, the batch size, the storage dtype, the settings of the
model the state belongs to (depth, widths, heads, segment length, memory capacity, eviction
policy, ...), every layer's memory shape ``(heads, capacity, dk, dv)`` and a SHA-256 over the
header and every tensor's name, dtype, shape and bytes.

Loading checks, in order: the file parses; the header is ours, of a version we read, and
complete; it matches the model (when one is given); the tensors are exactly those the header
implies, with the dtypes and shapes it implies; the digest matches (any flipped byte); values
are in range. Only then is a new state built, so a failed load never leaves anything
half-loaded. Every error names the file, the expected and the actual value.

The file itself (atomic write, the digest, the checks that do not depend on the state) is
:mod:`memgpt.memory.tensor_file`'s, shared with the files of ``MemoryState`` and ``MemoryStates``;
this module adds what a ``MemGPTState`` file holds.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..memory.state import metadata_dtype
from ..memory.tensor_file import (
    FLOAT_DTYPES,
    check_layout,
    check_values,
    digest,
    header_field,
    read_tensor_header,
    read_tensors,
    write_tensor_file,
)
from ..memory.tensor_file import METADATA_KEY as METADATA_KEY  # the header's metadata entry, here as before
from .config import MemGPTConfig

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "config_of",
    "write_state_file",
    "read_state_file",
    "read_header",
    "state_config",
    "state_spec",
]

STATE_FORMAT = "memgpt.MemGPTState"
"""The ``format`` field of a state file's header."""
STATE_VERSION = 2  # 1 was torch.save (read with weights_only=True); 2 is safetensors
"""The ``format_version`` this library writes (2: safetensors with a JSON header)."""

# The tensor file's, under the names this module had for them.
_DTYPES = FLOAT_DTYPES
_digest = digest
_field = header_field

# The settings of MemGPTConfig that decide what a state holds and means (shapes, the eviction
# policy that maintains the slot metadata, the token ids kept in ``previous``). Settings that
# only change how the state is *used* (scale, top_k, gated_scores, dropout) are not compared.
STATE_CONFIG_KEYS = (
    "vocab_size",
    "dim",
    "depth",
    "heads",
    "segment_len",
    "memory_heads",
    "memory_capacity",
    "key_dim",
    "value_dim",
    "eviction",
    "usage_decay",
    "token_shift",
    "shift_keys",
)
# Settings added to STATE_CONFIG_KEYS after files were first written, with the value every
# older file was written under (an older file lacks the key; it still loads).
LEGACY_DEFAULTS = {"shift_keys": False}


def _with_legacy_defaults(config: dict) -> dict:
    return {k: v for k, v in LEGACY_DEFAULTS.items() if k not in config} | config


def config_of(model: nn.Module | MemGPTConfig, what: str = "model") -> MemGPTConfig:
    """The :class:`MemGPTConfig` of ``model`` (a MemGPTModel, or the config itself)."""
    config = model if isinstance(model, MemGPTConfig) else getattr(model, "config", None)
    if not isinstance(config, MemGPTConfig):
        raise TypeError(f"{what} must be a MemGPTModel or a MemGPTConfig, got {type(model).__name__}")
    return config


def state_config(config: MemGPTConfig) -> dict:
    """The state-deciding settings of ``config``, key/value widths resolved."""
    out = {k: getattr(config, k) for k in STATE_CONFIG_KEYS}
    out["key_dim"], out["value_dim"] = config.memory_key_dim, config.memory_value_dim
    return out


def state_spec(config: dict, batch_size: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor of a state for ``config`` (a :func:`state_config`).

    The same layout as ``MemGPTModel.empty_state`` (a test holds the two together).
    """
    b, T, meta, long = batch_size, config["segment_len"], metadata_dtype(dtype), torch.long
    h, m, dk, dv = (config[k] for k in ("memory_heads", "memory_capacity", "key_dim", "value_dim"))
    ah, ad = config["heads"], config["dim"] // config["heads"]
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"position": ((b,), long), "previous": ((b,), long)}
    for i in range(config["depth"]):
        p = f"layers.{i}."
        spec |= {
            p + "memory.keys": ((b, h, m, dk), dtype),
            p + "memory.values": ((b, h, m, dv), dtype),
            p + "memory.valid": ((b, h, m), torch.bool),
            p + "memory.strength": ((b, h, m), meta),
            p + "memory.step": ((b, h, m), long),
            p + "memory.usage": ((b, h, m), meta),
            p + "memory.count": ((b,), long),
            p + "buffer.attn_keys": ((b, ah, T, ad), dtype),
            p + "buffer.attn_values": ((b, ah, T, ad), dtype),
            p + "buffer.keys": ((b, h, T, dk), dtype),
            p + "buffer.values": ((b, h, T, dv), dtype),
            p + "buffer.strength": ((b, h, T), meta),
        }
    return spec


def write_state_file(
    path: str | os.PathLike, tensors: dict[str, Tensor], config: MemGPTConfig, batch_size: int
) -> None:
    """Write a state's flat ``tensors`` (name -> tensor, as :func:`state_spec` lays them out for
    ``config``) to ``path`` atomically: a temporary file in the same folder, then ``os.replace``;
    a crash mid-save leaves the previous file intact. The tensors are detached and copied to CPU.
    A file that cannot be written raises OSError naming ``path``."""
    settings = state_config(config)
    path = os.fspath(path)
    dtype = tensors["layers.0.memory.keys"].dtype if config.depth else torch.get_default_dtype()
    if str(dtype).removeprefix("torch.") not in _DTYPES:
        raise ValueError(f"cannot save a state of dtype {dtype}: expected one of {sorted(_DTYPES)}")
    check_layout(
        f"state to save in {path!r} (made for another model?)",
        {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
        state_spec(settings, batch_size, dtype),
    )
    header = {
        "batch_size": batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "config": settings,
        "layers": [[settings["memory_heads"], settings["memory_capacity"], settings["key_dim"], settings["value_dim"]]]
        * settings["depth"],
    }
    write_tensor_file(path, tensors, header, format=STATE_FORMAT, version=STATE_VERSION)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a state file, checked for format, version and completeness."""
    where = repr(os.fspath(path))
    header = read_tensor_header(path, format=STATE_FORMAT, version=STATE_VERSION)
    if _field(where, header, "batch_size", int) < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {header['batch_size']}")
    if _field(where, header, "dtype", str) not in _DTYPES:
        raise ValueError(f"{where}: dtype expected one of {sorted(_DTYPES)}, got {header['dtype']!r}")
    config = _with_legacy_defaults(_field(where, header, "config", dict))
    if sorted(config) != sorted(STATE_CONFIG_KEYS):
        raise ValueError(f"{where}: config keys expected {sorted(STATE_CONFIG_KEYS)}, got {sorted(config)}")
    try:  # the settings must be ones a model can have: a MemGPTConfig validates them
        MemGPTConfig(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid model settings in the header: {e}") from e
    shapes = [config["memory_heads"], config["memory_capacity"], config["key_dim"], config["value_dim"]]
    if header.get("layers") != [shapes] * config["depth"]:
        raise ValueError(
            f"{where}: layer memory shapes expected {config['depth']} x (heads, capacity, dk, dv) = {shapes}, "
            f"got {header.get('layers')!r}"
        )
    return header


def _check_values(where: str, tensors: dict[str, Tensor], config: dict) -> None:
    """Ranges the model relies on (counters, token ids, gates); the digest has caught accidents already."""
    checks = [("position", 0, None), ("previous", 0, config["vocab_size"])]
    for i in range(config["depth"]):
        p = f"layers.{i}."
        checks += [(p + "memory.count", 0, None), (p + "memory.step", 0, None), (p + "memory.strength", 0, 1)]
        checks += [(p + "memory.usage", 0, None), (p + "buffer.strength", 0, 1)]
    for name, lo, hi in checks:
        check_values(where, name, tensors[name], lo, hi)  # NaN fails every bound


def read_state_file(
    path: str | os.PathLike, config: MemGPTConfig | None = None, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], dict]:
    """Read and check a file written by :func:`write_state_file`: ``(tensors, header)`` on CPU, or
    ValueError naming the file, the expected and the actual value.

    With ``config`` the header's settings must match it; with ``dtype`` the stored dtype must be it.
    A missing file raises FileNotFoundError.
    """
    want = None if config is None else state_config(config)
    where = repr(os.fspath(path))
    header = read_header(path)
    settings, batch = _with_legacy_defaults(header["config"]), header["batch_size"]
    stored = _DTYPES[header["dtype"]]
    tensors = read_tensors(path, header, state_spec(settings, batch, stored))  # layout, then the digest
    _check_values(where, tensors, settings)
    # Integrity first, then compatibility: a corrupt file is reported as corrupt, not as "another model".
    if want is not None:
        for key in STATE_CONFIG_KEYS:
            if want[key] != settings[key]:
                raise ValueError(
                    f"{where} was saved for another model: {key} expected {want[key]!r} (the model), "
                    f"got {settings[key]!r} (the file)"
                )
    if dtype is not None and stored != dtype:
        raise ValueError(f"{where} holds a {stored} state, the model computes in {dtype}")
    return tensors, header | {"config": settings}
