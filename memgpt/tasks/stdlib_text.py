"""Real text that nobody here wrote: the running interpreter's standard library, as characters.

Corpus recipe (deterministic for a given interpreter):

- every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, skipping the folders named in
  ``EXCLUDED_DIRS`` (installed packages, test suites, IDLE, lib2to3, tkinter, turtledemo,
  ensurepip, bytecode caches), as POSIX paths relative to that root, sorted;
- split by ``int(sha1(relative path), 16) % 10``: 0 = ``test``, 1 = ``validation``, the rest
  ``train``; the split of a file depends on its path only, so it is stable across versions;
- :meth:`StdlibCorpus.manifest` names the Python version and every file's split, size and sha256,
  so a result says exactly what it was measured on.

Characters (:class:`CharVocab`): ``\\t``, ``\\n`` and printable ASCII (``' '`` to ``'~'``) get
their own ids; everything else (``\\r``, non-ASCII characters, undecodable bytes) is one
out-of-vocabulary id. Files are decoded as UTF-8 with ``errors="replace"``, so reading never
fails: a multi-byte character or a bad byte becomes one OOV id.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharVocab", "StdlibCorpus", "EXCLUDED_DIRS", "SPLITS", "split_of", "list_stdlib_files", "stdlib_root"]

EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "__pycache__",
    }
)
"""Folders of the stdlib left out of the corpus (tests, IDLE, lib2to3, tkinter, ...)."""
SPLITS = ("train", "validation", "test")
"""The corpus splits, by ``split_of`` of each file's path."""


class CharVocab:
    """``\\t`` = 0, ``\\n`` = 1, ``chr(32 + i)`` = 2 + i for printable ASCII, everything else ``oov_id``."""

    chars = "\t\n" + "".join(chr(c) for c in range(32, 127))
    oov_id = len(chars)  # 97
    size = len(chars) + 1  # 98

    def __init__(self) -> None:
        table = np.full(128, self.oov_id, dtype=np.uint8)
        for i, ch in enumerate(self.chars):
            table[ord(ch)] = i
        self._table = table

    def encode(self, text: str) -> Tensor:
        """``text`` -> ids (n,) uint8, one id per character."""
        if not isinstance(text, str):
            raise TypeError(f"CharVocab.encode expects str, got {type(text).__name__}")
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.where(points < 128, self._table[np.minimum(points, 127)], self.oov_id).astype(np.uint8)
        return torch.from_numpy(ids)

    def encode_bytes(self, data: bytes) -> Tensor:
        """Raw file bytes -> ids (n,) uint8; never fails (UTF-8, undecodable bytes replaced)."""
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids: Tensor) -> str:
        """ids (n,) -> text; the OOV id becomes U+FFFD."""
        return "".join(self.chars[i] if i < self.oov_id else "\ufffd" for i in ids.tolist())


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: str | os.PathLike) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of the ``*.py`` files outside ``EXCLUDED_DIRS``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"stdlib root {str(root)!r} is not a folder")
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]  # prune: never descend into them
        rel = Path(folder).relative_to(root)
        found += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    return sorted(found)


def split_of(relpath: str) -> str:
    """``test`` / ``validation`` / ``train`` from ``sha1(relpath) % 10`` = 0 / 1 / 2-9."""
    bucket = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


@dataclass(frozen=True)
class StdlibCorpus:
    """The file list of one stdlib tree, by split. ``StdlibCorpus.scan()`` reads the running one."""

    root: Path
    files: dict[str, tuple[str, ...]]

    @classmethod
    def scan(cls, root: str | os.PathLike | None = None) -> StdlibCorpus:
        """The corpus of the stdlib at ``root`` (default: the running interpreter's), split by file path."""
        root = stdlib_root() if root is None else Path(root)
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for rel in list_stdlib_files(root):
            by_split[split_of(rel)].append(rel)
        return cls(root, {s: tuple(v) for s, v in by_split.items()})

    def _check(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")

    def load(self, split: str, vocab: CharVocab | None = None) -> list[tuple[str, Tensor]]:
        """``(relative path, ids (n,) uint8)`` for every file of ``split``, in path order."""
        self._check(split)
        vocab = vocab or CharVocab()
        return [(rel, vocab.encode_bytes((self.root / rel).read_bytes())) for rel in self.files[split]]

    def manifest(self) -> dict:
        """Python version, root, exclusions, and per file: split, bytes, sha256 (in path order)."""
        entries = []
        for rel in sorted(r for s in SPLITS for r in self.files[s]):
            data = (self.root / rel).read_bytes()
            entries.append(
                {"path": rel, "split": split_of(rel), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        return {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "root": str(self.root),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "split_rule": "int(sha1(relative posix path), 16) % 10: 0 test, 1 validation, 2-9 train",
            "counts": {s: len(self.files[s]) for s in SPLITS},
            "files": entries,
        }
