"""The file under every state file: a flat ``name -> tensor`` dict and a JSON header in one ``safetensors`` file.

This module knows neither a state nor a model. A state's format (``memgpt.models.state_file``
for a ``MemGPTState``, ``MemoryState.save`` for one store, ``MemoryStates.save`` for the stores
of a Hugging Face model) decides the header's fields and the tensors; this module writes them,
reads them back and runs the checks that do not depend on what the state is.

No pickle: the file is a JSON header plus raw tensor bytes, so loading one cannot run code.
The safetensors metadata holds one entry, ``memgpt.state``: the JSON header, with the format
name (``format``), its version (``format_version``), the library version that wrote it
(``library_version``), the fields of the format, and ``sha256``: a SHA-256 over the header
(without ``sha256``) and every tensor's name, dtype, shape and bytes (:func:`digest`).

Writing is atomic: a uniquely named temporary file in the same folder, flushed to disk, then
``os.replace``; a crash mid-save leaves the previous file intact and no temporary file behind.

Reading checks, in order: the file exists (else FileNotFoundError) and parses; its header is
JSON, of the expected format and version (:func:`read_tensor_header`); the format checks its own
fields and derives the tensors they imply, ``name -> (shape, dtype)``; the file holds exactly
those tensors, with those dtypes and shapes, and the digest matches (:func:`read_tensors`).
Every error is a ValueError naming the file, the expected and the actual value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .._version import __version__

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "METADATA_KEY",
    "FLOAT_DTYPES",
    "TensorSpec",
    "digest",
    "write_tensor_file",
    "read_tensor_header",
    "read_tensors",
    "check_layout",
    "header_field",
    "check_values",
]

METADATA_KEY = "memgpt.state"
"""The one safetensors metadata entry of a state file: its JSON header."""

FLOAT_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}
"""The storage dtypes a state file may hold, by the name its header records (``"float32"``, ...)."""

TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""``name -> (shape, dtype)``: the tensors a file must hold."""

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.long,
    "BOOL": torch.bool,
}


def _where(path: str | os.PathLike) -> str:
    return repr(os.fspath(path))


def digest(header: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) over ``header`` without its ``sha256`` entry (as sorted-key JSON) and every
    tensor's name, dtype, shape and bytes, in name order. ``tensors`` must be on the CPU."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # every dtype here is 1, 2, 4 or 8 bytes wide. The cast: an ndarray is a buffer, but numpy's
        # stubs declare its __buffer__ for Python >= 3.12 only.
        h.update(cast("Buffer", t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def check_layout(
    where: str, layout: Mapping[str, tuple], spec: Mapping[str, tuple], what: str = "state tensors"
) -> None:
    """``layout`` and ``spec``: name -> (shape, dtype); the names, shapes and dtypes must agree, else
    ValueError starting with ``where`` (a file, quoted) naming what is missing, extra or different."""
    missing, extra = sorted(set(spec) - set(layout)), sorted(set(layout) - set(spec))
    if missing or extra:
        raise ValueError(f"{where}: expected {len(spec)} {what}; missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (shape, dtype) in spec.items():
        if layout[name] != (shape, dtype):
            got_shape, got_dtype = layout[name]
            raise ValueError(f"{where}: tensor {name!r} expected {dtype} {shape}, got {got_dtype} {got_shape}")


def header_field(where: str, header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``header[key]``, which must be of type ``kind`` (a bool is not an int), else ValueError."""
    value = header.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{where}: header field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def check_values(
    where: str, name: str, t: Tensor, lo: float | None = None, hi: float | None = None, *, finite: bool = False
) -> None:
    """Every value of ``t`` (tensor ``name`` of the file ``where``) in ``[lo, hi]`` (None: unbounded
    on that side) and, with ``finite``, finite; NaN never passes a bound. Else ValueError naming the
    tensor, the range and the first value outside it."""
    ok = torch.ones_like(t, dtype=torch.bool)
    if lo is not None:
        ok &= t >= lo
    if hi is not None:
        ok &= t <= hi
    if finite:
        ok &= torch.isfinite(t)
    if not bool(ok.all()):
        bad = t[~ok][0].item()
        low = "-inf" if lo is None else lo
        high = "inf" if hi is None else hi
        kind = "finite values" if finite else "values"
        raise ValueError(f"{where}: tensor {name!r} expected {kind} in [{low}, {high}], got {bad}")


def _os_error(e: Exception, path: str) -> Exception:
    """safetensors reports I/O errors as its own error type, naming only its temporary file: an
    OSError of the same errno (PermissionError, ...) naming ``path`` instead (``e`` if none)."""
    found = re.search(r"os error (\d+)", str(e))
    if found is None:
        return e
    code = int(found.group(1))
    return OSError(code, f"{os.strerror(code)} (cannot write the state file)", path)


def write_tensor_file(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], header: Mapping[str, Any], *, format: str, version: int
) -> None:
    """Write ``tensors`` (name -> tensor; detached and copied to the CPU here) with ``header`` (a
    JSON-able dict of the format's own fields) to ``path``, atomically.

    The stored header is ``header`` plus ``format``, ``format_version`` (``version``),
    ``library_version`` and ``sha256`` (:func:`digest`). A file that cannot be written (a
    read-only folder, a full disk) raises OSError naming ``path``; the previous file, if any, is
    left as it was.
    """
    path = os.fspath(path)
    # clone: safetensors refuses tensors that share storage, and the file must not alias the state.
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    full = dict(header) | {"format": format, "format_version": version, "library_version": __version__}
    full["sha256"] = digest(full, tensors)

    from safetensors.torch import save_file

    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"  # same folder, so os.replace is atomic
    try:
        try:
            save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(full, sort_keys=True)})
        except OSError:
            raise
        except Exception as e:  # safetensors' own error type, for I/O errors too
            error = _os_error(e, path)
            if error is e:
                raise
            raise error from e
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_tensor_header(path: str | os.PathLike, *, format: str, version: int) -> dict[str, Any]:
    """The JSON header of the file at ``path``, checked to be a header of ``format`` at ``version``
    with a string ``library_version`` and ``sha256``; the format's own fields are the caller's to
    check. FileNotFoundError for a missing file, ValueError naming the file for any other."""
    from safetensors import safe_open

    where = _where(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no memgpt state file at {where}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type (and OSError, ...) for any bad file
        raise ValueError(f"{where} is not a readable safetensors file (a memgpt state file is one): {e}") from e
    if METADATA_KEY not in metadata:
        raise ValueError(f"{where} is not a memgpt state file: no {METADATA_KEY!r} entry in its metadata")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: corrupt state header (not JSON: {e})") from e
    if not isinstance(header, dict) or header.get("format") != format:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{where}: expected format {format!r}, got {got!r}")
    found = header.get("format_version")
    if type(found) is not int or found != version:
        raise ValueError(
            f"{where}: unsupported state file version: expected {version}, got {found!r} "
            f"(written by memgpt {header.get('library_version')!r})"
        )
    header_field(where, header, "library_version", str)
    header_field(where, header, "sha256", str)
    return header


def read_tensors(path: str | os.PathLike, header: Mapping[str, Any], spec: TensorSpec) -> dict[str, Tensor]:
    """The tensors of the file at ``path`` (on the CPU), once they are exactly those of ``spec``
    (names, dtypes, shapes: checked before any data is read) and the digest over them and
    ``header`` (as :func:`read_tensor_header` returned it) matches; else ValueError naming the file."""
    from safetensors import safe_open

    where = _where(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            # Names, shapes and dtypes first, from the file's own header: nothing is read if one is wrong.
            layout = {}
            for name in f.keys():
                s = f.get_slice(name)
                layout[name] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
            check_layout(where, layout, spec)
            tensors = {name: f.get_tensor(name) for name in spec}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own error type, OSError, ...
        raise ValueError(f"{where}: unreadable tensor data: {e}") from e
    found = digest(header, tensors)
    if found != header["sha256"]:
        raise ValueError(
            f"{where}: corrupt state file: SHA-256 of header and tensors expected {header['sha256'][:16]}..., "
            f"got {found[:16]}..."
        )
    return tensors
