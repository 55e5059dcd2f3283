"""Character language modelling on stdlib files: training windows, far-copyable mask, copy probe.

- :class:`TextWindowTask`: windows of ``segments * segment_len`` characters at offsets drawn
  uniformly over every valid (file, offset) pair of a split; the target at each position is the
  next character. Each window is its own sample, so memory starts empty at every window.
  ``repeat_prob`` > 0 copies, in that fraction of windows, one chunk of the window further on
  (:func:`insert_repeats`): a change of the training data, off by default.
- :func:`far_copyable_mask`: which characters could be copied from far back: those whose
  preceding ``context`` characters last occurred more than ``distance`` characters earlier.
- :func:`copy_probe`: ``[A][filler][A]`` with ``A`` a chunk of one file and the filler from
  another; only the second ``A`` carries targets, and ``query_segment`` marks where it starts
  (clearing memory there is the ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import IGNORE_INDEX, TaskBatch, positive
from .stdlib_text import CharVocab, StdlibCorpus

__all__ = ["TextWindowTask", "far_copyable_mask", "copy_probe", "insert_repeats"]


def _window_counts(lengths: Tensor, need: int) -> Tensor:
    """(f,) number of windows of ``need`` characters that fit in each file."""
    return (lengths - need + 1).clamp_min(0)


def sample_windows(files: list[Tensor], length: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """(b length) int64 windows drawn uniformly over all (file, offset) pairs that fit."""
    lengths = torch.tensor([len(f) for f in files], dtype=torch.long)
    counts = _window_counts(lengths, length)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"no file holds a window of {length} characters (longest: {int(lengths.max())})")
    ends = counts.cumsum(0)
    draws = torch.randint(total, (batch_size,), generator=generator)
    which = torch.searchsorted(ends, draws, right=True)  # (b,) file index
    offsets = draws - (ends[which] - counts[which])
    return torch.stack([files[int(f)][int(o) : int(o) + length].long() for f, o in zip(which, offsets)])


def insert_repeats(
    windows: Tensor,
    prob: float,
    *,
    min_len: int,
    max_len: int,
    min_distance: int,
    max_distance: int,
    generator: torch.Generator,
) -> Tensor:
    """windows (b L) -> a copy where each row, with probability ``prob``, has one chunk repeated.

    Per chosen row: a length ``c`` uniform in [min_len, max_len] (both clipped to at most
    ``L - min_distance``, so that a chunk fits), a distance ``D`` uniform in
    [min_distance, min(max_distance, L - c)], a source start ``s`` uniform in [0, L - c - D];
    then ``row[s+D : s+D+c] = row[s : s+c]`` (the original chunk). With ``min_distance`` >= the
    segment length, every repeated character's source lies in an earlier segment, so only
    memory can copy it. No random number is drawn when ``prob`` is 0.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"insert_repeats: prob must be in [0, 1], got {prob}")
    if prob == 0.0:
        return windows
    b, L = windows.shape
    if not 1 <= min_len <= max_len or not 1 <= min_distance <= max_distance or min_distance >= L:
        raise ValueError(
            f"insert_repeats: need 1 <= min_len <= max_len, 1 <= min_distance <= max_distance and "
            f"min_distance < window length {L}; got lengths [{min_len}, {max_len}], "
            f"distances [{min_distance}, {max_distance}]"
        )
    c_hi = min(max_len, L - min_distance)
    c_lo = min(min_len, c_hi)
    out = windows.clone()
    chosen = torch.rand(b, generator=generator) < prob
    for r in chosen.nonzero().flatten().tolist():
        c = int(torch.randint(c_lo, c_hi + 1, (1,), generator=generator))
        hi = min(max_distance, L - c)
        d = int(torch.randint(min_distance, hi + 1, (1,), generator=generator))
        s = int(torch.randint(0, L - c - d + 1, (1,), generator=generator))
        out[r, s + d : s + d + c] = windows[r, s : s + c]
    return out


@dataclass
class TextWindowTask:
    """Next-character prediction on windows of ``segments * segment_len`` characters of ``split``.

    ``root`` None = the running interpreter's stdlib. The files are read once, at construction.
    ``repeat_prob`` > 0: that fraction of windows gets one chunk of ``repeat_len`` (min, max)
    characters repeated ``repeat_distance`` (min, max; default one segment to the whole window)
    characters further on (:func:`insert_repeats`), a curriculum for copying through memory.
    """

    segment_len: int = 128
    segments: int = 8
    split: str = "train"
    root: str | None = None
    repeat_prob: float = 0.0
    repeat_len: tuple[int, int] = (32, 256)
    repeat_distance: tuple[int, int] | None = None
    files: list[Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        positive("TextWindowTask", "segment_len", self.segment_len)
        positive("TextWindowTask", "segments", self.segments)
        if (
            isinstance(self.repeat_prob, bool)
            or not isinstance(self.repeat_prob, (int, float))
            or not (0.0 <= self.repeat_prob <= 1.0)
        ):
            raise ValueError(f"TextWindowTask.repeat_prob must be a float in [0, 1], got {self.repeat_prob!r}")
        repeat_len = tuple(self.repeat_len)
        repeat_distance = tuple(
            (self.segment_len, self.seq_len) if self.repeat_distance is None else self.repeat_distance
        )
        self.repeat_len = _int_pair("repeat_len", repeat_len)
        self.repeat_distance = _int_pair("repeat_distance", repeat_distance)
        corpus = StdlibCorpus.scan(self.root)
        self.files = [ids for _, ids in corpus.load(self.split)]

    @property
    def vocab_size(self) -> int:
        """The character vocabulary's size (``CharVocab.size``)."""
        return CharVocab.size

    @property
    def seq_len(self) -> int:
        """``L``, characters per window: ``segments * segment_len``."""
        return self.segments * self.segment_len

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """input_ids (b L), targets (b L) = the next character at every position."""
        positive("TextWindowTask.sample", "batch_size", batch_size)
        windows = sample_windows(self.files, self.seq_len + 1, batch_size, generator)
        if self.repeat_prob:
            if self.repeat_distance is None:  # __post_init__ set it; only a later assignment can undo that
                raise TypeError("TextWindowTask.repeat_distance must be two ints (min, max), got None")
            (lo, hi), (dlo, dhi) = self.repeat_len, self.repeat_distance
            windows = insert_repeats(
                windows,
                float(self.repeat_prob),
                min_len=lo,
                max_len=hi,
                min_distance=dlo,
                max_distance=dhi,
                generator=generator,
            )
        return TaskBatch(windows[:, :-1], windows[:, 1:].contiguous(), self.segment_len, self.segments - 1)


def _int_pair(name: str, lo_hi: tuple[object, ...]) -> tuple[int, int]:
    """``lo_hi`` as ``(min, max)``, two ints with ``1 <= min <= max``, or ValueError naming the field."""
    if len(lo_hi) == 2:
        lo, hi = lo_hi
        if isinstance(lo, int) and not isinstance(lo, bool) and isinstance(hi, int) and not isinstance(hi, bool):
            if 1 <= lo <= hi:
                return lo, hi
    raise ValueError(f"TextWindowTask.{name} must be two ints 1 <= min <= max, got {lo_hi!r}")


def far_copyable_mask(ids: Tensor, *, context: int = 16, distance: int = 128) -> Tensor:
    """ids (n,) -> bool (n,): True at ``t`` iff ``ids[t-context:t]`` occurred before, ending at
    some ``j < t``, and its most recent such occurrence is more than ``distance`` back (``t - j >
    distance``). Characters with no earlier occurrence of their context, or a recent one, are False.
    """
    if ids.dim() != 1:
        raise ValueError(f"far_copyable_mask expects ids (n,), got shape {tuple(ids.shape)}")
    positive("far_copyable_mask", "context", context)
    positive("far_copyable_mask", "distance", distance, minimum=0)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) > 255):
        raise ValueError(f"far_copyable_mask expects ids in [0, 256), got [{int(ids.min())}, {int(ids.max())}]")
    data = ids.to(torch.uint8).numpy().tobytes()
    last: dict[bytes, int] = {}
    out = [False] * len(data)
    for t in range(context, len(data)):
        key = data[t - context : t]
        j = last.get(key)
        out[t] = j is not None and t - j > distance
        last[key] = t
    return torch.tensor(out, dtype=torch.bool)


def copy_probe(
    files: list[Tensor],
    num_probes: int,
    *,
    chunk_len: int = 256,
    filler_len: int = 256,
    segment_len: int = 128,
    generator: torch.Generator,
) -> TaskBatch:
    """``[A][filler][A]`` per row: ``A`` = ``chunk_len`` characters at a random offset of a random
    file, the filler = ``filler_len`` characters of another file.

    targets are the next character at the positions of the second ``A`` (its characters 2 to
    ``chunk_len``, read from its own first character on; its first character follows the filler
    and could not be predicted from ``A``); -100 elsewhere. Both lengths must be multiples of
    ``segment_len`` so the second ``A`` starts a segment: ``query_segment`` is its index.
    """
    positive("copy_probe", "num_probes", num_probes)
    for name, value in (("chunk_len", chunk_len), ("filler_len", filler_len)):
        positive("copy_probe", name, value)
        if value % segment_len:
            raise ValueError(f"copy_probe: {name} ({value}) must be a multiple of segment_len ({segment_len})")
    if filler_len < 2 * segment_len:
        raise ValueError(f"copy_probe: filler_len ({filler_len}) must span >= 2 segments ({2 * segment_len})")
    usable = [i for i, f in enumerate(files) if len(f) >= max(chunk_len, filler_len)]
    if len(usable) < 2:
        raise ValueError(
            f"copy_probe needs >= 2 files of >= {max(chunk_len, filler_len)} characters, got {len(usable)}"
        )
    rows = []
    for _ in range(num_probes):
        a, b = torch.randperm(len(usable), generator=generator)[:2].tolist()
        fa, fb = files[usable[a]], files[usable[b]]
        oa = int(torch.randint(len(fa) - chunk_len + 1, (1,), generator=generator))
        ob = int(torch.randint(len(fb) - filler_len + 1, (1,), generator=generator))
        chunk = fa[oa : oa + chunk_len].long()
        rows.append(torch.cat([chunk, fb[ob : ob + filler_len].long(), chunk]))
    ids = torch.stack(rows)
    q0 = chunk_len + filler_len
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, q0 : q0 + chunk_len - 1] = ids[:, q0 + 1 : q0 + chunk_len]
    return TaskBatch(ids, targets, segment_len, q0 // segment_len)
